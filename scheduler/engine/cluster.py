"""Free GPUs, CPUs and memory per node, and best-fit gang placement with topology domains."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping

from sortedcontainers import SortedList

from scheduler.engine.model import JobSpec, NodeSpec, exact, gpu_amount
from scheduler.engine.nodes import Freed, Node, Placement, mig_gpus, settle_held, workers_per_node
from scheduler.engine.sharing import ShareKey, fgd_key

# Node, Freed and workers_per_node live in nodes.py; importers of this module read them here too.
__all__ = ["Freed", "Node", "Placement", "Pool", "workers_per_node"]


class Pool:
    """The nodes of one GPU model, with free-GPU buckets so that best fit for one worker is quick.

    GPU sharing (docs/scheduling.md): a fractional worker joins a shared GPU with room or opens a free whole GPU
    (out of `free`, so that buckets and slots keep counting whole GPUs); a shared GPU whose fractions have all
    left returns to `free`. `loose` bounds the room outside whole free GPUs (the most room on a shared GPU, 1
    while any MIG slice is free): cheap tests of "could a job fit" compare requests with free_gpus + loose."""

    def __init__(
        self,
        name: str,
        nodes: list[NodeSpec],
        domains: Mapping[str, Collection[str]],
        share_key: ShareKey = fgd_key,
    ):
        self.name = name
        self.nodes: dict[str, Node] = {}
        for spec in sorted(nodes, key=lambda n: n.name):
            self.nodes[spec.name] = Node(
                spec,
                free=list(range(spec.gpus)),
                free_cpus=math.inf if spec.cpus is None else spec.cpus,
                free_mem=math.inf if spec.memory_gb is None else spec.memory_gb,
                mig_free=dict(spec.mig),
            )
        # GPU sharing: nodes with shared GPUs or MIG slices (what `loose` and fractional placement read), the
        # fractional sizes pending in the pool (PoolState keeps them: the mix the placement rule weighs), the rule.
        self.sharing: set[str] = {n.name for n in nodes if n.mig}
        self.mig_nodes = [n for n in sorted(nodes, key=lambda n: n.name) if n.mig]
        self.fractions: Counter[float] = Counter()
        self.share_key = share_key
        self.loose: float = 0
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
        self.capacity: float = 0  # GPUs on nodes that are up (and their MIG slices' fractions)
        self.free_gpus = 0
        self.freed = 0  # counts releases and nodes coming up: anything that can give a job more room
        self.changes = 0  # counts every change to free GPUs: what a cached answer about free room depends on
        for n in self.nodes.values():
            self._bring_up(n)

    def _bring_up(self, n: Node) -> None:
        self.freed += 1
        self.changes += 1
        n.up = True
        # Rounded after each change: with MIG slices the capacity is a fraction, and a node going up and down must
        # leave exactly what it found (a rebuilt engine computes it afresh, and fair shares read it).
        self.capacity = gpu_amount(self.capacity + n.spec.gpus + (mig_gpus(n.spec) if n.spec.mig else 0))
        self.free_gpus += len(n.free)
        self._file(n.name, len(n.free))
        if n.name in self.sharing:
            self._loosen()

    def most_room(self) -> float:
        """The most room on a shared GPU of an up node (0: none), for pending reasons."""
        rooms = [exact(1 - u) for name in self.sharing if self.nodes[name].up for u in self.nodes[name].shared.values()]
        return max(rooms, default=0)

    def _loosen(self) -> None:
        """Recount `loose` after a change to a sharing node."""
        loose: float = 0
        for name in self.sharing:
            n = self.nodes[name]
            if not n.up:
                continue
            if any(k > 0 for k in n.mig_free.values()):
                loose = 1
                break
            for used in n.shared.values():
                loose = max(loose, exact(1 - used))
        self.loose = loose

    def set_up(self, name: str, up: bool) -> None:
        n = self.nodes[name]
        if n.up == up:
            return
        if up:
            self._bring_up(n)
        else:
            self.changes += 1
            n.up = False
            self.capacity = gpu_amount(self.capacity - n.spec.gpus - (mig_gpus(n.spec) if n.spec.mig else 0))
            self.free_gpus -= len(n.free)
            self._unfile(n.name, len(n.free))
            if name in self.sharing:
                self._loosen()

    def allocate(self, spec: JobSpec, nodes: list[str]) -> Placement:
        """Take GPUs (lowest free index first), CPUs and memory for each worker on its node."""
        if spec.shared:
            return self._allocate_shared(spec, nodes[0])
        out: Placement = []
        self.changes += 1
        for name, workers in Counter(nodes).items() if len(nodes) > 1 else [(nodes[0], 1)] if nodes else []:
            if len(self.nodes[name].free) < spec.gpus * workers:  # never a placement counting GPUs not there
                raise ValueError(f"node {name} has {len(self.nodes[name].free)} free GPUs, not {spec.gpus * workers}")
        for name in nodes:
            n = self.nodes[name]
            self._unfile(name, len(n.free))
            g = int(spec.gpus)
            gpus, n.free = n.free[:g], n.free[g:]
            self._file(name, len(n.free))
            n.free_cpus = exact(n.free_cpus - spec.cpus)
            n.free_mem = exact(n.free_mem - spec.memory_gb)
            self.free_gpus -= len(gpus)
            out.append((name, gpus))
        return out

    def _allocate_shared(self, spec: JobSpec, name: str) -> Placement:
        """A fractional or MIG worker on node `name`: the GPU (or slice) the placement rule picks there, with the
        job itself counted in the pending mix as when it was placed."""
        f = spec.gpus
        if spec.mig is None:
            self.fractions[f] += 1
        try:
            pick = self.pick_shared(spec, only=name)
        finally:
            if spec.mig is None:
                self.unpend_fraction(f)
        if pick is None:
            raise ValueError(f"node {name} has no room for {f} of a GPU" + (f" ({spec.mig})" if spec.mig else ""))
        self._take_shared(spec, name, pick[1])
        return [(name, [] if pick[1] is None else [pick[1]])]

    def unpend_fraction(self, f: float) -> None:
        """A fractional job of `f` left the pending mix (PoolState keeps the mix; allocate borrows it)."""
        self.fractions[f] -= 1
        if not self.fractions[f]:
            del self.fractions[f]

    def _take_shared(self, spec: JobSpec, name: str, g: int | None) -> None:
        """Take a MIG slice (g None), or `spec.gpus` of GPU g (opening it if free), and CPUs and memory."""
        n = self.nodes[name]
        self.changes += 1
        if g is None:
            assert spec.mig is not None
            n.mig_free[spec.mig] -= 1
        elif g in n.shared:
            n.shared[g] = exact(n.shared[g] + spec.gpus)
        else:
            before = self._unfile_node(n)
            n.free.remove(g)
            self._refile_node(n, before)
            n.shared[g] = spec.gpus
            self.sharing.add(name)
        n.free_cpus = exact(n.free_cpus - spec.cpus)
        n.free_mem = exact(n.free_mem - spec.memory_gb)
        self._loosen()

    def _release_shared(self, spec: JobSpec, name: str, gpus: list[int]) -> None:
        n = self.nodes[name]
        if spec.mig is not None:
            n.mig_free[spec.mig] += 1
        for g in gpus:
            left = exact(n.shared[g] - spec.gpus)
            if left > 0:
                n.shared[g] = left
                continue
            del n.shared[g]  # its last fraction left: a whole free GPU again
            if not n.shared and not n.spec.mig:
                self.sharing.discard(name)
            before = self._unfile_node(n)
            n.free = sorted([*n.free, g])
            settle_held(n)
            self._refile_node(n, before)
        n.free_cpus = exact(n.free_cpus + spec.cpus)
        n.free_mem = exact(n.free_mem + spec.memory_gb)
        self._loosen()

    def take(self, spec: JobSpec, workers: Placement) -> None:
        """Take exactly these GPUs (a job the service found running after a restart); ValueError if any is not
        free, so that a GPU is never held twice."""
        if spec.shared:
            for name, gpus in workers:
                n = self.nodes.get(name)
                if n is None:
                    raise ValueError(f"node {name} does not exist")
                g = gpus[0] if gpus else None
                if spec.mig is not None:
                    ok = not gpus and n.mig_free.get(spec.mig, 0) > 0
                else:
                    ok = len(gpus) == 1 and (g in n.free or (g in n.shared and exact(n.shared[g] + spec.gpus) <= 1))
                if not ok:
                    what = f"a {spec.mig} slice" if spec.mig else f"{spec.gpus} of GPU {gpus}"
                    raise ValueError(f"{what} of node {name} is not free")
                self._take_shared(spec, name, g)
            return
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
        if spec.shared:
            for name, gpus in workers:
                self._release_shared(spec, name, gpus)
            return
        for name, gpus in workers:
            n = self.nodes[name]
            before = self._unfile_node(n)
            n.free = sorted(n.free + gpus)
            settle_held(n)  # GPUs others took while this job still held them are theirs first
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
        settle_held(n)
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
        if spec.mig is not None:
            return sum(workers_per_node(spec, n.gpus, n.cpus, n.memory_gb, n.mig) for n in self.mig_nodes)
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
        if spec.shared:
            pick = self.pick_shared(spec, excluded, freed)
            return None if pick is None else [pick[0]]
        if spec.workers == 1:
            node = self._best_fit_one(spec, excluded, freed)
            return None if node is None else [node]
        room = self._room(int(spec.gpus), excluded, freed)
        if spec.workers > 1 and self.domains:
            fitting = []
            for d, members in self.domains.items():
                sub = {n: room[n] for n in members if n in room}
                chosen = _best_fit(sub, spec)
                if chosen is not None:
                    free = sum(
                        len(self.nodes[n].free)
                        + (freed.gpus.get(n, 0) + (self.cleared(n, freed) if freed.shared else 0) if freed else 0)
                        for n in members
                        if self.nodes[n].up and n not in excluded
                    )
                    fitting.append((free, d, chosen))
            if fitting:
                return min(fitting, key=lambda f: (f[0], f[1]))[2]
        return _best_fit(room, spec)

    def _best_fit_one(
        self, spec: JobSpec, excluded: Collection[str], freed: Freed | None, gpus: int | None = None
    ) -> str | None:
        """What _best_fit would choose for one worker (of `gpus` whole GPUs: default spec.gpus), without reading
        every node: the nodes that victims free GPUs on are weighed one by one, the others found in their
        free-GPU bucket."""
        want = int(spec.gpus) if gpus is None else gpus
        best: tuple[int, str] | None = None
        weighed: Collection[str] = ()
        if freed is not None:
            weighed = freed.nodes()
            for name in weighed:
                n = self.nodes[name]
                free = len(n.free) + freed.gpus.get(name, 0) - n.owed
                if freed.shared:
                    free += self.cleared(name, freed)
                if (
                    n.up
                    and name not in excluded
                    and free >= want
                    and self._fits_besides(n, spec, freed)
                    and (best is None or (free, name) < best)
                ):
                    best = (free, name)
        for k in range(want, self.max_gpus + 1):
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

    def cleared(self, name: str, freed: Freed | None) -> int:
        """Shared GPUs of node `name` whose every fraction the victims free: whole free GPUs in a plan."""
        if freed is None or not freed.shared.get(name):
            return 0
        n = self.nodes[name]
        return sum(1 for g, used in n.shared.items() if exact(used - freed.frac.get((name, g), 0.0)) <= 0)

    def pick_shared(
        self, spec: JobSpec, excluded: Collection[str] = (), freed: Freed | None = None, only: str | None = None
    ) -> tuple[str, int | None] | None:
        """Where a fractional or MIG worker goes (docs/scheduling.md, GPU sharing): (node, GPU index), the index
        None for a MIG slice; None when nowhere. `only`: on that node alone (allocate's choice of GPU there).

        A MIG slice: the node with the fewest free slices of its profile, then the lowest name. A fraction: a
        shared GPU with room, the one `share_key` ranks first (the fragmentation it adds for the pending mix,
        fgd_key; then the room left, node name, index); a free whole GPU only where no shared GPU has room, on
        the node with the fewest free whole GPUs (best fit), lowest index."""
        f = spec.gpus
        if spec.mig is not None:
            profile = spec.mig
            best_mig: tuple[int, str] | None = None
            names = [only] if only is not None else (n.name for n in self.mig_nodes)
            for name in names:
                n = self.nodes[name]
                slices = n.mig_free.get(profile, 0) + (freed.mig.get((name, profile), 0) if freed else 0)
                if (
                    slices > 0
                    and n.up
                    and name not in excluded
                    and self._fits_besides(n, spec, freed)
                    and (best_mig is None or (slices, name) < best_mig)
                ):
                    best_mig = (slices, name)
            return None if best_mig is None else (best_mig[1], None)
        best: tuple[tuple[float, ...], str, int] | None = None
        candidates = self.sharing if freed is None else self.sharing | freed.nodes()
        for name in [only] if only is not None else candidates:
            n = self.nodes[name]
            if not n.shared or not n.up or name in excluded or not self._fits_besides(n, spec, freed):
                continue
            for g, used in n.shared.items():
                if freed is not None and freed.shared.get(name):
                    used = exact(used - freed.frac.get((name, g), 0.0))
                    if used <= 0:
                        continue  # every fraction freed: a whole free GPU (below)
                room = exact(1 - used)
                if room >= f:
                    key = (self.share_key(room, f, self.fractions), name, g)
                    if best is None or key < best:
                        best = key
        if best is not None:
            return best[1], best[2]
        if only is not None:
            n = self.nodes[only]
            if not (n.up and only not in excluded and self._fits_besides(n, spec, freed)):
                return None
            if n.free:
                return only, n.free[0]
            for g, used in sorted(n.shared.items()):  # cleared by victims (a plan's count)
                if freed is not None and exact(used - freed.frac.get((only, g), 0.0)) <= 0:
                    return only, g
            return None
        node = self._best_fit_one(spec, excluded, freed, 1)
        return None if node is None else (node, -1)

    def _room(self, gpus: int, excluded: Collection[str], freed: Freed | None) -> dict[str, list[float]]:
        """Free GPUs, CPUs and memory of the up nodes that could take a worker of `gpus` GPUs."""
        names: set[str] = set()
        for k in range(gpus, self.max_gpus + 1):
            names.update(self.buckets[k])
        if freed is not None:
            names.update(n for n in freed.nodes() if self.nodes[n].up)
        room: dict[str, list[float]] = {}
        for name in names:
            if name in excluded:
                continue
            n = self.nodes[name]
            r = [float(len(n.free)), n.free_cpus, n.free_mem]
            if freed is not None:
                r[0] += freed.gpus.get(name, 0) - n.owed
                if freed.shared:
                    r[0] += self.cleared(name, freed)
                r[1] = exact(r[1] + freed.cpus.get(name, 0.0))
                r[2] = exact(r[2] + freed.mem.get(name, 0.0))
            if r[0] >= gpus:
                room[name] = r
        return room


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
