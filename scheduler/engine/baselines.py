"""Baseline policies for comparison, run by the same simulator: fifo, strict-quota, las."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping

from quotas import QueueSpec, QueueTree
from scheduler.engine.decisions import Decision, Preempted
from scheduler.engine.engine import Engine
from scheduler.engine.model import Job, JobState, NodeSpec, Reason, Settings
from scheduler.engine.state import PoolState, arrival_key

POLICIES = ("corral", "fifo", "strict-quota", "las")


class FifoEngine(Engine):
    """One global queue per pool in submit order; the first job that does not fit blocks the ones behind it.

    Limits still hold (a job over its queue's limit is passed over, it does not block); quotas, fair share,
    priorities and preemption play no part.
    """

    preemption = False
    arrival_order = staticmethod(arrival_key)

    def _schedule_pool(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        assert ps.arrivals is not None
        i = 0
        while i < len(ps.arrivals):
            job: Job = ps.arrivals[i]
            q = self.tree[job.spec.queue]
            if ps.over_limit(q, job.request) is not None:
                i += 1
                continue
            nodes = ps.pool.place(job.spec)
            if nodes is None:
                return  # head-of-line blocking: that is what FIFO means
            out.append(self._start(ps, job, nodes, now))  # removes it from arrivals: i stays


class StrictQuotaEngine(Engine):
    """Each queue capped at its quota: no borrowing, hence no preemption. Quota 0 in a pool means no access."""

    preemption = False

    def __init__(self, tree: QueueTree, nodes: Iterable[NodeSpec],
                 domains: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
                 settings: Settings | None = None):
        nodes = list(nodes)
        pools = sorted({n.pool for n in nodes})
        capped = [QueueSpec(s.name, s.parent, s.quota,
                            {p: min(s.limit.get(p, s.quota.get(p, 0)), s.quota.get(p, 0)) for p in pools},
                            s.weight, s.default_weight) for s in tree.specs]
        super().__init__(QueueTree(capped, tree.capacity), nodes, domains, settings)


class LasEngine(Engine):
    """Least attained GPU-service first, with preemption (Tiresias' discretised 2D-LAS).

    Attained service is GPUs x seconds run, over all runs of a job. Jobs fall into bands at 1 and 10
    GPU-hours; within a band the earlier submission goes first. Bands, not raw service, keep two jobs of
    similar service from preempting each other back and forth.
    """

    bands = (3600.0, 36000.0)  # GPU-seconds

    def __init__(self, tree: QueueTree, nodes: Iterable[NodeSpec],
                 domains: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
                 settings: Settings | None = None):
        self._attained: dict[str, float] = {}
        self._clock = 0.0
        # Waiting jobs by (band, submit): a waiting job's attained service does not change.
        self.arrival_order = self._waiting_key
        super().__init__(tree, nodes, domains, settings)

    def _waiting_key(self, j: Job) -> tuple[float, ...]:
        return (self._band(self._attained.get(j.id, 0.0)), j.submit, j.seq)

    def _service(self, j: Job, now: float) -> float:
        run = (now - j.start) * j.request if j.state is JobState.RUNNING else 0.0
        return self._attained.get(j.id, 0.0) + run

    def _band(self, service: float) -> int:
        return sum(1 for b in self.bands if service >= b)

    def _release(self, ps: PoolState, job: Job, moving: bool = False) -> None:
        self._attained[job.id] = self._service(job, self._clock)
        super()._release(ps, job, moving)

    def finish(self, job_id: str, now: float, failed: bool = False) -> bool:
        self._clock = now
        return super().finish(job_id, now, failed)

    def cancel(self, job_id: str, now: float) -> bool:
        self._clock = now
        return super().cancel(job_id, now)

    def node_down(self, name: str, now: float) -> list[Decision]:
        self._clock = now
        return super().node_down(name, now)

    def schedule(self, now: float) -> list[Decision]:
        self._clock = now
        out = super().schedule(now)
        # Wake up when a running job crosses into the next band: it may then give way.
        crossings = [now + (b - s) / j.request
                     for ps in self.pools.values() if ps.pending for js in ps.running.values() for j in js
                     if j.request > 0 for s in (self._service(j, now),) for b in self.bands[self._band(s):][:1]]
        if crossings:
            heapq.heappush(self._wakeups, min(crossings))
        return out

    def _fill(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        """Start waiting jobs in (band, submit) order wherever they fit."""
        assert ps.arrivals is not None
        i = 0
        while i < len(ps.arrivals) and ps.pool.free_gpus >= ps.min_need():
            j: Job = ps.arrivals[i]
            nodes = None
            if ps.over_limit(self.tree[j.spec.queue], j.request) is None:
                nodes = ps.pool.place(j.spec)
            if nodes is None:
                i += 1
            else:
                out.append(self._start(ps, j, nodes, now))  # leaves arrivals: i stays

    def _schedule_pool(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        assert ps.arrivals is not None
        lowest = self._band(self._attained.get(ps.arrivals[0].id, 0.0))
        if all(self._band(self._service(j, now)) <= lowest for js in ps.running.values() for j in js):
            # Nobody waiting is in a lower band than a running job: nothing to preempt, fill the free GPUs.
            self._fill(ps, now, out)
            return
        jobs = [j for js in ps.running.values() for j in js] + list(ps.arrivals)
        # Within a band, running jobs keep their GPUs: only a job of a lower band displaces one.
        jobs.sort(key=lambda j: (self._band(self._service(j, now)), j.state is not JobState.RUNNING, j.submit, j.seq))
        # Choose who should run by GPU count within capacity and limits; young jobs (min_runtime) stay.
        keep: set[str] = set()
        used: Counter[str] = Counter()
        budget = ps.pool.capacity

        def take(j: Job) -> None:
            nonlocal budget
            keep.add(j.id)
            budget -= j.request
            for a in self.tree[j.spec.queue].path:
                used[a.name] += j.request

        for j in jobs:
            if j.state is JobState.RUNNING and (not j.spec.preemptible or self._young(j, now)):
                take(j)
        for j in jobs:
            if budget <= 0:
                break
            path = self.tree[j.spec.queue].path
            if j.id not in keep and j.request <= budget and all(
                    used[a.name] + j.request <= a.limit_of(ps.name) for a in path):
                take(j)
        for j in jobs:
            if j.state is JobState.RUNNING and j.id not in keep:
                self._stop(ps, j)
                self._preempted_now.add(j.id)
                out.append(Preempted(j.id, "priority", None, Reason(
                    "las", f"{j.id} has attained {self._service(j, now):.0f} GPU-seconds; jobs with less go first",
                    {"attained": self._service(j, now)})))
        # Start the chosen jobs (best fit), then let any other waiting job use GPUs left free.
        for chosen in (True, False):
            for j in jobs:
                if ps.pool.free_gpus <= 0:
                    break
                if j.state is not JobState.PENDING or (j.id in keep) != chosen or j.id in self._preempted_now:
                    continue
                if ps.over_limit(self.tree[j.spec.queue], j.request) is not None:
                    continue
                nodes = ps.pool.place(j.spec)
                if nodes is not None:
                    out.append(self._start(ps, j, nodes, now))


def make_policy(name: str, tree: QueueTree, nodes: Iterable[NodeSpec],
                domains: Mapping[str, Mapping[str, Iterable[str]]], settings: Settings) -> Engine:
    """The engine for a policy name: `corral` (SCHEDULING.md) or one of the baselines."""
    engines: dict[str, type[Engine]] = {"corral": Engine, "fifo": FifoEngine, "strict-quota": StrictQuotaEngine,
                                        "las": LasEngine}
    if name not in engines:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return engines[name](tree, nodes, domains, settings)
