"""Nodes that preemption could clear completely: a cheap bound checked before walking victim candidates.

In a saturated pool most failed preemption plans are for jobs whose workers each need a whole node (8-GPU
workers on 8-GPU nodes). Such a worker fits on a node only once every job on it is gone, and the fair-share
tier takes a job j of leaf V only while V's ratio after losing it stays at or above the beneficiary's ratio
after starting. So j can ever be taken only if its *slack*, ratio(usage(V) - request(j), share(V)), reaches
that ratio (taking other jobs of V first only lowers it), and a node can be cleared only if the smallest
slack of its jobs reaches it. Counting those nodes, plus the whole free ones, bounds the workers the
greedy walk could ever place: when the count is short of the gang, the walk would fail, so it is skipped.

The slacks are kept per node in one sorted list, refreshed lazily for the queues and nodes that changed,
so the count is a bisection.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping

from sortedcontainers import SortedList

from scheduler.engine.model import Job, gpu_amount


def slack(usage: float, share: float, request: float) -> float:
    """ratio(usage - request, share), as state.ratio computes it (infinite where the share is 0)."""
    if share <= 0:
        return math.inf
    left = usage - request
    return (left if type(left) is int else gpu_amount(left)) / share


class ClearIndex:
    """Per node, the smallest fair-share slack of the jobs on it (-inf: a job no fair-share reclaim may take)."""

    def __init__(self) -> None:
        self.on_node: dict[str, set[Job]] = {}  # running jobs per node
        self.slack: dict[str, float] = {}  # node (with jobs) -> smallest slack of its jobs, as last refreshed
        self.order: SortedList = SortedList()  # (slack, node)
        self.dirty_queues: set[str] = set()  # leaves whose usage, share or over-share mark changed
        self.dirty_nodes: set[str] = set()  # nodes whose set of jobs changed
        self.over: set[str] = set()  # leaves over their fair share at the last refresh

    # ----- changes (PoolState calls these) -----

    def add(self, job: Job) -> None:
        # Only workers holding GPUs block a node: one without GPUs leaves a whole-node worker room.
        for node, gpus in job.workers:
            if gpus:
                self.on_node.setdefault(node, set()).add(job)
                self.dirty_nodes.add(node)

    def remove(self, job: Job) -> None:
        for node, gpus in job.workers:
            jobs = self.on_node.get(node)
            if not gpus or jobs is None:
                continue  # no GPUs there, or a second worker on a node already cleared
            jobs.discard(job)
            if not jobs:
                del self.on_node[node]
            self.dirty_nodes.add(node)

    def queue_changed(self, leaf: str) -> None:
        self.dirty_queues.add(leaf)

    # ----- queries -----

    def refresh(
        self,
        running: Mapping[str, Collection[Job]],
        usage: Mapping[str, float],
        shares: Mapping[str, float],
        over_share: Collection[str],
    ) -> None:
        """Bring the slacks up to date with the pool's current usage, shares and over-share marks."""
        nodes = self.dirty_nodes
        for leaf in self.dirty_queues:
            if leaf in over_share:
                self.over.add(leaf)
            elif leaf in self.over:
                self.over.discard(leaf)
            else:
                continue  # under its share before and after: its jobs' slacks stay -inf whatever moved
            for j in running.get(leaf, ()):
                for node, _ in j.workers:
                    nodes.add(node)
        self.dirty_queues.clear()
        # Per leaf over its share: its usage and share (None: not over its share, so its jobs' slacks are -inf).
        terms: dict[str, tuple[float, float] | None] = {}
        for node in nodes:
            old = self.slack.get(node)
            jobs = self.on_node.get(node)
            low: float | None = None
            if jobs:
                low = math.inf
                for j in jobs:
                    v = j.spec.queue
                    if v in terms:
                        term = terms[v]
                    else:
                        term = terms[v] = (usage[v], shares.get(v, 0.0)) if v in over_share else None
                    if term is None or not j.spec.preemptible:
                        low = -math.inf
                        break  # nothing is lower
                    s = slack(term[0], term[1], j.request)
                    if s < low:
                        low = s
            if low == old:
                continue  # most changes leave a node's smallest slack where it was: keep the sorted list as is
            if old is not None:
                self.order.remove((old, node))
                del self.slack[node]
            if low is not None:
                self.slack[node] = low
                self.order.add((low, node))
        nodes.clear()

    def at_least(self, threshold: float) -> Iterator[str]:
        """Nodes with jobs, every one of them with a slack at or above `threshold` (refresh first)."""
        return (node for _, node in self.order.irange((threshold, "")))

    def clears(self, node: str, threshold: float) -> bool:
        return self.slack.get(node, -math.inf) >= threshold
