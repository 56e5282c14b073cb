"""A node's live state (free GPUs, shared GPUs, MIG slices, CPUs, memory), what victims free, what one node holds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scheduler.engine.model import JobSpec, NodeSpec, exact, gpu_amount, mig_fraction

# Per worker: (node, GPU indices). A fractional job: [(node, [the GPU it shares])]; a MIG job: [(node, [])]
# (see JobSpec and Job.workers).
Placement = list[tuple[str, list[int]]]


@dataclass(eq=False)
class Node:
    """A node's live state: which GPU indices are free, and free CPUs and memory where accounted. `up` False: nothing
    new is placed there (down, or cordoned with its jobs still running)."""

    spec: NodeSpec
    up: bool = True
    free: list[int] = field(default_factory=list)  # free GPU indices, ascending
    free_cpus: float = math.inf
    free_mem: float = math.inf
    # What pods Corral did not place (a DaemonSet's, kube-scheduler's) hold there: out of the free amounts above.
    held: list[int] = field(default_factory=list)  # GPU indices counted as theirs
    held_gpus: int = 0  # what they hold; more than len(held) only while Corral's jobs still have the rest
    held_cpus: float = 0.0
    held_mem: float = 0.0
    # GPU sharing: GPU index -> the fraction fractional jobs hold of it (out of `free` while any does), and free
    # MIG slices per profile.
    shared: dict[int, float] = field(default_factory=dict)
    mig_free: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def owed(self) -> int:
        """GPUs others hold that Corral's jobs still have: the first ones those jobs free go to them."""
        return self.held_gpus - len(self.held)


@dataclass
class Freed:
    """Resources a placement may count as free on top of what nodes have (a preemption's victims): whole GPUs
    per node; fractions per shared GPU (a GPU whose every fraction is freed counts as a free whole GPU, see
    Pool.cleared); MIG slices per node and profile; and how many sharing victims per node (for upper bounds)."""

    gpus: dict[str, int] = field(default_factory=dict)
    cpus: dict[str, float] = field(default_factory=dict)
    mem: dict[str, float] = field(default_factory=dict)
    frac: dict[tuple[str, int], float] = field(default_factory=dict)
    mig: dict[tuple[str, str], int] = field(default_factory=dict)
    shared: dict[str, int] = field(default_factory=dict)

    def add(self, workers: Iterable[tuple[str, list[int]]], spec: JobSpec, sign: int = 1) -> None:
        for node, gpus in workers:
            if spec.shared:
                self.shared[node] = self.shared.get(node, 0) + sign
                if spec.mig is not None:
                    self.mig[node, spec.mig] = self.mig.get((node, spec.mig), 0) + sign
                else:
                    for g in gpus:
                        self.frac[node, g] = exact(self.frac.get((node, g), 0.0) + sign * spec.gpus)
            else:
                self.gpus[node] = self.gpus.get(node, 0) + sign * len(gpus)
            self.cpus[node] = exact(self.cpus.get(node, 0.0) + sign * spec.cpus)
            self.mem[node] = exact(self.mem.get(node, 0.0) + sign * spec.memory_gb)

    def nodes(self) -> set[str]:
        """Nodes where victims free GPUs, fractions of GPUs or MIG slices."""
        out = {n for n, g in self.gpus.items() if g > 0}
        if self.shared:
            out.update(n for n, k in self.shared.items() if k > 0)
        return out


def mig_gpus(spec: NodeSpec) -> float:
    """What a node's MIG slices add to its pool's capacity: their fractions, summed."""
    return gpu_amount(sum(count * mig_fraction(p) for p, count in spec.mig.items())) if spec.mig else 0


def settle_held(n: Node) -> None:
    """Move GPU indices between free and held until others hold what they hold (as far as free ones allow): the
    highest free indices first, so that Corral's own stay packed at the bottom."""
    while len(n.held) > n.held_gpus:
        n.free.append(n.held.pop())
    n.free.sort()
    while len(n.held) < n.held_gpus and n.free:
        n.held.append(n.free.pop())


def workers_per_node(
    spec: JobSpec, gpus: int, cpus: float | None, memory_gb: float | None, mig: Mapping[str, int] | None = None
) -> int:
    """How many workers of `spec` (at most all of them) one empty node of that size (and MIG layout) holds."""
    per = [spec.workers]
    if spec.mig is not None:
        per.append(min(1, (mig or {}).get(spec.mig, 0)))
    elif spec.shared:
        per.append(min(1, gpus))
    elif spec.gpus:
        per.append(gpus // int(spec.gpus))
    if spec.cpus and cpus is not None:
        per.append(math.floor(exact(cpus / spec.cpus)))  # 2.0 // 0.1 is 19.0
    if spec.memory_gb and memory_gb is not None:
        per.append(math.floor(exact(memory_gb / spec.memory_gb)))
    return min(per)
