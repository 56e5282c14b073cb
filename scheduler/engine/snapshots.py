"""Frozen copies of what the engine knows of a pool, for readers outside it (the service's views, sandboxes)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scheduler.engine.model import add_gpus
from scheduler.engine.state import PoolState


@dataclass(frozen=True)
class PoolLoad:
    """One pool's queues: GPUs held, fair shares and backlog, copied at one instant (read under the caller's lock)."""

    name: str
    # GPUs are ints while whole; fractions of GPUs (GPU sharing) make them floats
    usage: Mapping[str, float]  # any queue -> GPUs its subtree's running jobs hold
    np_usage: Mapping[str, float]  # any queue -> GPUs its subtree's non-preemptible running jobs hold
    shares: Mapping[str, float]  # any queue -> its fair share of the pool now, GPUs
    pending_sizes: Mapping[str, Mapping[float, int]]  # leaf -> GPUs a pending job asks -> how many such jobs
    running_jobs: Mapping[str, int]  # leaf -> running jobs

    def used(self, queue: str) -> float:
        return self.usage.get(queue, 0)

    def np_used(self, queue: str) -> float:
        return self.np_usage.get(queue, 0)

    def share(self, queue: str) -> float:
        return self.shares.get(queue, 0.0)

    def backlog(self, leaves: Iterable[str]) -> tuple[int, float]:
        """Pending jobs and the GPUs they ask in these leaves, from the counts by size (not job by job)."""
        sizes = [self.pending_sizes.get(leaf, {}) for leaf in leaves]
        gpus: float = 0
        for s in sizes:
            for g, n in s.items():
                gpus = add_gpus(gpus, g * n)
        return sum(n for s in sizes for n in s.values()), gpus

    def running(self, leaves: Iterable[str]) -> int:
        return sum(self.running_jobs.get(leaf, 0) for leaf in leaves)


@dataclass(frozen=True)
class NodeGpus:
    """One node of a pool: its GPUs and the engine's job holding each (engine job ids)."""

    name: str
    gpus: int
    holders: Mapping[int, str]  # GPU index -> job id (a shared GPU: its first job); free GPUs are absent
    # GPU sharing: GPU index -> (job id, fraction) of every fractional job on that GPU; MIG profile -> (slices,
    # free slices)
    shared: Mapping[int, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    mig: Mapping[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolGpus:
    """One pool's nodes and GPUs: capacity counts nodes that are up."""

    name: str
    capacity: float
    free_gpus: int
    nodes: tuple[NodeGpus, ...]


def pool_load(ps: PoolState) -> PoolLoad:
    return PoolLoad(
        name=ps.name,
        usage=dict(ps.usage),
        np_usage=dict(ps.np_usage),
        shares=dict(ps.shares()),
        pending_sizes={leaf: dict(sizes) for leaf, sizes in ps.pending_sizes.items() if sizes},
        running_jobs={leaf: len(jobs) for leaf, jobs in ps.running.items() if jobs},
    )


def pool_gpus(ps: PoolState) -> PoolGpus:
    holder: dict[tuple[str, int], str] = {}
    shared: dict[str, dict[int, list[tuple[str, float]]]] = {}
    for leaf_jobs in ps.running.values():
        for j in leaf_jobs:
            for node, gpus in j.workers:
                for g in gpus:
                    holder.setdefault((node, g), j.id)
                    if j.spec.shared:
                        shared.setdefault(node, {}).setdefault(g, []).append((j.id, j.spec.gpus))
    nodes = tuple(
        NodeGpus(
            n.name,
            n.spec.gpus,
            {i: holder[(n.name, i)] for i in range(n.spec.gpus) if (n.name, i) in holder},
            {g: tuple(sorted(js)) for g, js in sorted(shared.get(n.name, {}).items())},
            {p: (k, n.mig_free.get(p, 0)) for p, k in sorted(n.spec.mig.items())},
        )
        for n in ps.pool.nodes.values()
    )
    return PoolGpus(ps.name, ps.pool.capacity, ps.pool.free_gpus, nodes)
