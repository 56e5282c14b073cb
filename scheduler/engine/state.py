"""Per-pool bookkeeping: pending and running jobs per leaf queue, usage up the tree, fair shares, ratios."""

from __future__ import annotations

import math
from collections import Counter

from sortedcontainers import SortedList

from quotas import QueueTree, fair_shares
from quotas.tree import Queue
from scheduler.engine.cluster import Pool
from scheduler.engine.model import Job


def victim_key(j: Job) -> tuple[int, float, int, str]:
    """Preemption order inside one queue: lowest priority, then most recent start (admitted later first)."""
    return (j.spec.priority, -j.start, -j.admitted, j.id)


def arrival_key(j: Job) -> tuple[float, int]:
    return (j.submit, j.seq)


def ratio(usage: float, share: float) -> float:
    """usage / fair share; infinite where the share is 0."""
    return usage / share if share > 0 else math.inf


def quota_ratio(usage: float, quota: float) -> float:
    """usage / quota with 0/0 = 0 and x/0 = infinite: the tie-break between equal ratios."""
    if quota > 0:
        return usage / quota
    return 0.0 if usage == 0 else math.inf


class PoolState:
    """Everything the engine keeps for one pool; every mutation goes through start/stop/add/remove."""

    def __init__(self, pool: Pool, tree: QueueTree, track_arrivals: bool = False):
        self.pool = pool
        self.tree = tree
        self.name = pool.name
        self.pending: dict[str, SortedList] = {}  # leaf -> jobs in queue order
        self.running: dict[str, SortedList] = {}  # leaf -> jobs in victim order
        self.usage: Counter[str] = Counter()  # any queue -> GPUs held in its subtree
        self.pending_gpus: Counter[str] = Counter()  # leaf -> GPUs asked by its pending jobs
        self.pending_sizes: dict[str, Counter[int]] = {}  # leaf -> request -> count (for quick skips)
        self._shares: dict[str, float] = {}
        self._shares_dirty = True
        self.dirty = True  # something changed since the last scheduling pass
        self.skipped: set[Job] = set()  # head jobs whose starvation clock runs
        # All pending jobs of the pool in submit order, kept only for policies that need one global queue.
        self.arrivals: SortedList | None = SortedList(key=arrival_key) if track_arrivals else None

    # ----- pending -----

    def add_pending(self, job: Job) -> None:
        q = job.spec.queue
        self.pending.setdefault(q, SortedList(key=Job.order_key)).add(job)
        self.pending_gpus[q] += job.request
        self.pending_sizes.setdefault(q, Counter())[job.request] += 1
        if self.arrivals is not None:
            self.arrivals.add(job)
        self._changed()

    def remove_pending(self, job: Job) -> None:
        q = job.spec.queue
        jobs = self.pending[q]
        jobs.remove(job)
        if not jobs:
            del self.pending[q]
        self.pending_gpus[q] -= job.request
        sizes = self.pending_sizes[q]
        sizes[job.request] -= 1
        if not sizes[job.request]:
            del sizes[job.request]
        if self.arrivals is not None:
            self.arrivals.remove(job)
        self._changed()

    def min_pending(self, leaf: str) -> int:
        return min(self.pending_sizes[leaf])

    # ----- running -----

    def add_running(self, job: Job) -> None:
        q = self.tree[job.spec.queue]
        self.running.setdefault(q.name, SortedList(key=victim_key)).add(job)
        for a in q.path:
            self.usage[a.name] += job.request
        self._changed()

    def remove_running(self, job: Job) -> None:
        q = self.tree[job.spec.queue]
        jobs = self.running[q.name]
        jobs.remove(job)
        if not jobs:
            del self.running[q.name]
        for a in q.path:
            self.usage[a.name] -= job.request
        self._changed()

    def _changed(self) -> None:
        self._shares_dirty = True
        self.dirty = True

    def capacity_changed(self) -> None:
        self._changed()

    # ----- fair share -----

    def shares(self) -> dict[str, float]:
        if self._shares_dirty:
            demand = {q: self.usage[q] + self.pending_gpus[q] for q in set(self.pending_gpus) | set(self.running)}
            self._shares = fair_shares(self.tree, self.name, self.pool.capacity, demand)
            self._shares_dirty = False
        return self._shares

    def ratio(self, q: Queue, extra: int = 0) -> float:
        return ratio(self.usage[q.name] + extra, self.shares().get(q.name, 0.0))

    def queue_key(self, q: Queue) -> tuple[float, float, str]:
        """Which leaf queue goes first: lowest ratio, then lowest usage/quota, then name."""
        u = self.usage[q.name]
        return (self.ratio(q), quota_ratio(u, q.quota_of(self.name)), q.name)

    def over_limit(self, q: Queue, request: int, freed: Counter[str] | None = None) -> tuple[Queue, int] | None:
        """The first queue on q's path whose limit `request` more GPUs would break, with its usage."""
        for a in q.path:
            u = self.usage[a.name] - (freed[a.name] if freed else 0)
            if u + request > a.limit_of(self.name):
                return a, u
        return None
