"""Free GPUs, CPUs and memory per node, and best-fit gang placement with topology domains."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from scheduler.engine.model import JobSpec, NodeSpec, exact

# Per worker: (node, GPU indices).
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

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def owed(self) -> int:
        """GPUs others hold that Corral's jobs still have: the first ones those jobs free go to them."""
        return self.held_gpus - len(self.held)


@dataclass
class Freed:
    """Resources a placement may count as free on top of what nodes have (a preemption's victims)."""

    gpus: dict[str, int] = field(default_factory=dict)
    cpus: dict[str, float] = field(default_factory=dict)
    mem: dict[str, float] = field(default_factory=dict)

    def add(self, workers: Iterable[tuple[str, list[int]]], spec: JobSpec, sign: int = 1) -> None:
        for node, gpus in workers:
            self.gpus[node] = self.gpus.get(node, 0) + sign * len(gpus)
            self.cpus[node] = exact(self.cpus.get(node, 0.0) + sign * spec.cpus)
            self.mem[node] = exact(self.mem.get(node, 0.0) + sign * spec.memory_gb)


class Pool:
    """The nodes of one GPU model, with free-GPU buckets so that best fit for one worker is quick."""

    def __init__(self, name: str, nodes: list[NodeSpec], domains: Mapping[str, Collection[str]]):
        self.name = name
        self.nodes: dict[str, Node] = {}
        for spec in sorted(nodes, key=lambda n: n.name):
            self.nodes[spec.name] = Node(
                spec,
                free=list(range(spec.gpus)),
                free_cpus=math.inf if spec.cpus is None else spec.cpus,
                free_mem=math.inf if spec.memory_gb is None else spec.memory_gb,
            )
        self.max_gpus = max((n.gpus for n in nodes), default=0)
        # Distinct node shapes (GPUs, CPUs, memory): what "can any node ever hold this worker?" checks.
        self.shapes = Counter((n.gpus, n.cpus, n.memory_gb) for n in nodes)
        self.total_gpus = sum(n.gpus for n in nodes)  # configured, up or down: what a job may ever ask for
        self.domains = {d: sorted(ns) for d, ns in sorted(domains.items())}
        # buckets[k]: up nodes with exactly k free GPUs, by name.
        self.buckets: list[SortedList] = [SortedList() for _ in range(self.max_gpus + 1)]
        # slots[g]: workers of g GPUs the up nodes' free GPUs could hold, by count (sum of free // g), kept with
        # the buckets: every room test of a sleeping queue reads it.
        self.slots = [0] * (self.max_gpus + 1)
        self.capacity = 0  # GPUs on nodes that are up
        self.free_gpus = 0
        self.freed = 0  # counts releases and nodes coming up: anything that can give a job more room
        self.changes = 0  # counts every change to free GPUs: what a cached answer about free room depends on
        for n in self.nodes.values():
            self._bring_up(n)

    def _bring_up(self, n: Node) -> None:
        self.freed += 1
        self.changes += 1
        n.up = True
        self.capacity += n.spec.gpus
        self.free_gpus += len(n.free)
        self._file(n.name, len(n.free))

    def set_up(self, name: str, up: bool) -> None:
        n = self.nodes[name]
        if n.up == up:
            return
        if up:
            self._bring_up(n)
        else:
            self.changes += 1
            n.up = False
            self.capacity -= n.spec.gpus
            self.free_gpus -= len(n.free)
            self._unfile(n.name, len(n.free))

    def allocate(self, spec: JobSpec, nodes: list[str]) -> Placement:
        """Take GPUs (lowest free index first), CPUs and memory for each worker on its node."""
        out: Placement = []
        self.changes += 1
        for name, workers in Counter(nodes).items() if len(nodes) > 1 else [(nodes[0], 1)] if nodes else []:
            if len(self.nodes[name].free) < spec.gpus * workers:  # never a placement counting GPUs not there
                raise ValueError(f"node {name} has {len(self.nodes[name].free)} free GPUs, not {spec.gpus * workers}")
        for name in nodes:
            n = self.nodes[name]
            self._unfile(name, len(n.free))
            gpus, n.free = n.free[: spec.gpus], n.free[spec.gpus :]
            self._file(name, len(n.free))
            n.free_cpus = exact(n.free_cpus - spec.cpus)
            n.free_mem = exact(n.free_mem - spec.memory_gb)
            self.free_gpus -= len(gpus)
            out.append((name, gpus))
        return out

    def take(self, spec: JobSpec, workers: Placement) -> None:
        """Take exactly these GPUs (a job the service found running after a restart); ValueError if any is not
        free, so that a GPU is never held twice."""
        for name, gpus in workers:
            n = self.nodes.get(name)
            if n is None or not set(gpus) <= set(n.free):
                raise ValueError(f"GPUs {gpus} of node {name} are not free")
        self.changes += 1
        for name, gpus in workers:
            n = self.nodes[name]
            if n.up:
                self._unfile(name, len(n.free))
                self.free_gpus -= len(gpus)
            n.free = [g for g in n.free if g not in gpus]
            n.free_cpus = exact(n.free_cpus - spec.cpus)
            n.free_mem = exact(n.free_mem - spec.memory_gb)
            if n.up:
                self._file(name, len(n.free))

    def release(self, spec: JobSpec, workers: Placement) -> None:
        self.freed += 1
        self.changes += 1
        for name, gpus in workers:
            n = self.nodes[name]
            before = self._unfile_node(n)
            n.free = sorted(n.free + gpus)
            _settle_held(n)  # GPUs others took while this job still held them are theirs first
            n.free_cpus = exact(n.free_cpus + spec.cpus)
            n.free_mem = exact(n.free_mem + spec.memory_gb)
            self._refile_node(n, before)

    def hold(self, name: str, gpus: int, cpus: float, memory_gb: float) -> None:
        """What pods Corral did not place hold on the node now (replacing what was said before): it leaves the free
        room. GPUs beyond the free ones (others placed them beside Corral's jobs) are taken as those jobs end."""
        n = self.nodes[name]
        if gpus < n.held_gpus or cpus < n.held_cpus or memory_gb < n.held_mem:
            self.freed += 1  # room given back, as by a release
        self.changes += 1
        before = self._unfile_node(n)
        n.held_gpus = gpus
        _settle_held(n)
        n.free_cpus = exact(n.free_cpus + n.held_cpus - cpus)
        n.free_mem = exact(n.free_mem + n.held_mem - memory_gb)
        n.held_cpus, n.held_mem = cpus, memory_gb
        self._refile_node(n, before)

    def _unfile_node(self, n: Node) -> int:
        """Before a node's free GPUs change: out of its bucket (if up); how many were free."""
        if n.up:
            self._unfile(n.name, len(n.free))
        return len(n.free)

    def _refile_node(self, n: Node, before: int) -> None:
        if n.up:
            self._file(n.name, len(n.free))
            self.free_gpus += len(n.free) - before

    def workers_fit_empty(self, spec: JobSpec) -> int:
        """How many workers of `spec` the pool could hold with every node (up or down) empty."""
        return sum(workers_per_node(spec, g, c, m) * count for (g, c, m), count in self.shapes.items())

    def _file(self, name: str, free: int) -> None:
        """An up node with `free` free GPUs joins its bucket and the slot counts."""
        self.buckets[free].add(name)
        slots = self.slots
        for g in range(1, free + 1):
            slots[g] += free // g

    def _unfile(self, name: str, free: int) -> None:
        self.buckets[free].remove(name)
        slots = self.slots
        for g in range(1, free + 1):
            slots[g] -= free // g

    def worker_slots(self, gpus: int) -> int:
        """Workers of `gpus` GPUs (at least 1) the free GPUs could hold, by GPU count alone."""
        return self.slots[gpus] if gpus <= self.max_gpus else 0

    def largest_free(self) -> int:
        for k in range(self.max_gpus, -1, -1):
            if self.buckets[k]:
                return k
        return 0

    # ----- placement -----

    def place(self, spec: JobSpec, excluded: Collection[str] = (), freed: Freed | None = None) -> list[str] | None:
        """Nodes for each worker (best fit, one domain when one can hold the gang), or None when it cannot fit."""
        if spec.workers == 1:
            node = self._best_fit_one(spec, excluded, freed)
            return None if node is None else [node]
        room = self._room(spec.gpus, excluded, freed)
        if spec.workers > 1 and self.domains:
            fitting = []
            for d, members in self.domains.items():
                sub = {n: room[n] for n in members if n in room}
                chosen = _best_fit(sub, spec)
                if chosen is not None:
                    free = sum(
                        len(self.nodes[n].free) + (freed.gpus.get(n, 0) if freed else 0)
                        for n in members
                        if self.nodes[n].up and n not in excluded
                    )
                    fitting.append((free, d, chosen))
            if fitting:
                return min(fitting, key=lambda f: (f[0], f[1]))[2]
        return _best_fit(room, spec)

    def _best_fit_one(self, spec: JobSpec, excluded: Collection[str], freed: Freed | None) -> str | None:
        """What _best_fit would choose for one worker, without reading every node: the nodes that victims free
        GPUs on are weighed one by one, the others found in their free-GPU bucket."""
        best: tuple[int, str] | None = None
        weighed: Collection[str] = ()
        if freed is not None:
            weighed = {name for name, g in freed.gpus.items() if g > 0}
            for name in weighed:
                n = self.nodes[name]
                free = len(n.free) + freed.gpus[name] - n.owed
                if (
                    n.up
                    and name not in excluded
                    and free >= spec.gpus
                    and self._fits_besides(n, spec, freed)
                    and (best is None or (free, name) < best)
                ):
                    best = (free, name)
        for k in range(spec.gpus, self.max_gpus + 1):
            if best is not None and k > best[0]:
                break
            for name in self.buckets[k]:
                if best is not None and (k, name) >= best:
                    break
                if name not in excluded and name not in weighed and self._fits_besides(self.nodes[name], spec, freed):
                    best = (k, name)
                    break
        return None if best is None else best[1]

    @staticmethod
    def _fits_besides(n: Node, spec: JobSpec, freed: Freed | None) -> bool:
        """Enough free CPUs and memory for one worker (with what victims free there)."""
        if freed is None:
            return n.free_cpus >= spec.cpus and n.free_mem >= spec.memory_gb
        return (
            exact(n.free_cpus + freed.cpus.get(n.name, 0.0)) >= spec.cpus
            and exact(n.free_mem + freed.mem.get(n.name, 0.0)) >= spec.memory_gb
        )

    def _room(self, gpus: int, excluded: Collection[str], freed: Freed | None) -> dict[str, list[float]]:
        """Free GPUs, CPUs and memory of the up nodes that could take a worker of `gpus` GPUs."""
        names: set[str] = set()
        for k in range(gpus, self.max_gpus + 1):
            names.update(self.buckets[k])
        if freed is not None:
            names.update(n for n, g in freed.gpus.items() if g > 0 and self.nodes[n].up)
        room: dict[str, list[float]] = {}
        for name in names:
            if name in excluded:
                continue
            n = self.nodes[name]
            r = [float(len(n.free)), n.free_cpus, n.free_mem]
            if freed is not None:
                r[0] += freed.gpus.get(name, 0) - n.owed
                r[1] = exact(r[1] + freed.cpus.get(name, 0.0))
                r[2] = exact(r[2] + freed.mem.get(name, 0.0))
            if r[0] >= gpus:
                room[name] = r
        return room


def _settle_held(n: Node) -> None:
    """Move GPU indices between free and held until others hold what they hold (as far as free ones allow): the
    highest free indices first, so that Corral's own stay packed at the bottom."""
    while len(n.held) > n.held_gpus:
        n.free.append(n.held.pop())
    n.free.sort()
    while len(n.held) < n.held_gpus and n.free:
        n.held.append(n.free.pop())


def workers_per_node(spec: JobSpec, gpus: int, cpus: float | None, memory_gb: float | None) -> int:
    """How many workers of `spec` (at most all of them) one empty node of that size holds."""
    per = [spec.workers]
    if spec.gpus:
        per.append(gpus // spec.gpus)
    if spec.cpus and cpus is not None:
        per.append(math.floor(exact(cpus / spec.cpus)))  # 2.0 // 0.1 is 19.0
    if spec.memory_gb and memory_gb is not None:
        per.append(math.floor(exact(memory_gb / spec.memory_gb)))
    return min(per)


def _best_fit(room: dict[str, list[float]], spec: JobSpec) -> list[str] | None:
    """Place workers one by one on the fitting node with the fewest free GPUs, then the lowest name."""
    room = {n: list(r) for n, r in room.items()}
    chosen: list[str] = []
    for _ in range(spec.workers):
        best: tuple[float, str] | None = None
        for name, (g, c, m) in room.items():
            if g >= spec.gpus and c >= spec.cpus and m >= spec.memory_gb and (best is None or (g, name) < best):
                best = (g, name)
        if best is None:
            return None
        r = room[best[1]]
        r[0] -= spec.gpus
        r[1] = exact(r[1] - spec.cpus)
        r[2] = exact(r[2] - spec.memory_gb)
        chosen.append(best[1])
    return chosen
