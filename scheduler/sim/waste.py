"""What a replay wasted: waits while the pool had room, starvation-guard holds, preemptions lost for nothing."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.engine import JobSpec, NodeSpec
from scheduler.engine.cluster import workers_per_node
from scheduler.engine.decisions import Hold
from scheduler.engine.model import exact
from scheduler.sim.inputs import World

# Hold.cause values (scheduler.engine.decisions), in the order the report shows them.
HOLD_CAUSES = ("held_nodes", "queue_mate", "guarantee", "limit")
NODE_DOWN = "node_down"  # a failure, not a decision: left out of the preemption counts below

Placement = Mapping[str, Sequence[int]]  # node -> GPU indices, as a `started` event carries them


@dataclass
class IdleWait:
    """Waits with room to spare, of one queue or of all: see idle_waits()."""

    gpu_seconds: float = 0.0  # sum over jobs of request x seconds it waited while it could have started
    jobs: int = 0  # jobs that waited so for any time at all
    max_seconds: float = 0.0  # the longest such wait of one job (all its waits so added up)
    # The part of gpu_seconds by preemptible jobs: non-preemptible ones may wait on their guarantee with GPUs
    # free by design (SCHEDULING.md, Guarantee), so this part is the clearer sign of a fault.
    preemptible_gpu_seconds: float = 0.0


@dataclass
class HoldCounts:
    """Distinct jobs the starvation guard held back, per cause, overall and per queue of the held job."""

    jobs: dict[str, int]  # cause -> distinct jobs held (a job held for two causes counts under both)
    queues: dict[str, dict[str, int]]  # queue -> cause -> distinct jobs
    held: int  # distinct jobs held, whatever the cause
    starving: int  # distinct starving jobs something was held for
    records: int  # Hold records (a job is recorded at every pass that holds it)


@dataclass
class PreemptionWaste:
    """Decided preemptions (node failures left out) and the work they threw away; see analyse()."""

    preemptions: int = 0
    same_instant: int = 0  # the victim started again at the instant it was preempted
    moved: int = 0  # of those, the preemptor could not have been placed had the victims stayed put
    lost_gpu_seconds: float = 0.0  # victims' GPUs x time run since their last start (0 with checkpoint)
    lost_for_nothing_gpu_seconds: float = 0.0  # the part lost by same-instant preemptions that were not moves

    @property
    def for_nothing(self) -> int:
        return self.same_instant - self.moved


@dataclass
class Waste:
    """Everything this module measures of one replay."""

    idle: IdleWait
    idle_queues: dict[str, IdleWait]
    preemption: PreemptionWaste
    holds: HoldCounts | None  # None: the policy records no holds


def count_holds(holds: Iterable[Hold] | None, queue_of: Mapping[str, str]) -> HoldCounts | None:
    """Distinct held jobs per cause and per queue (`queue_of`: job -> queue; unknown jobs go under "?")."""
    if holds is None:
        return None
    seen: dict[str, set[str]] = defaultdict(set)
    starving: set[str] = set()
    records = 0
    for h in holds:
        records += 1
        seen[h.cause].add(h.job)
        starving.add(h.starving)
    causes = [*HOLD_CAUSES, *sorted(set(seen) - set(HOLD_CAUSES))]  # a cause added later still shows
    queues: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(causes, 0))
    for cause in causes:
        for job in seen[cause]:
            queues[queue_of.get(job, "?")][cause] += 1
    return HoldCounts(
        {c: len(seen[c]) for c in causes},
        dict(sorted(queues.items())),
        len(set().union(*seen.values())),
        len(starving),
        records,
    )


# ----- the replay of the event log against the cluster -----


@dataclass
class _Node:
    spec: NodeSpec
    up: bool = True
    held: set[int] = field(default_factory=set)  # GPUs whole-GPU jobs hold
    cpus: float | None = None  # free; None where the node does not declare them (not accounted)
    mem: float | None = None
    shared: dict[int, float] = field(default_factory=dict)  # GPU -> the part fractional jobs hold of it, > 0
    mig: Counter[str] = field(default_factory=Counter)  # MIG profile -> slices held

    @property
    def free(self) -> int:
        """GPUs free for whole-GPU jobs: a GPU that fractional jobs share is not."""
        return self.spec.gpus - len(self.held) - len(self.shared)

    def room_for_share(self, spec: JobSpec) -> bool:
        """Could one worker of a GPU-sharing job (a fraction or a MIG slice) start here now?"""
        if (self.cpus is not None and self.cpus < spec.cpus) or (self.mem is not None and self.mem < spec.memory_gb):
            return False
        if spec.mig is not None:
            return self.spec.mig.get(spec.mig, 0) > self.mig[spec.mig]
        return self.free > 0 or any(exact(a + spec.gpus) <= 1 for a in self.shared.values())


@dataclass(eq=False)
class _Key:
    """Pending jobs that get the same answer to "could it start now?": one queue, one shape.

    `total` integrates the time the answer was yes, so a job's wait with room is the growth of the integral
    over its wait: no per-job work at each instant."""

    queue: str
    spec: JobSpec
    count: int = 0
    eligible: bool = False
    since: float = 0.0
    total: float = 0.0

    def integral(self, t: float) -> float:
        return self.total + (t - self.since if self.eligible else 0.0)

    def set(self, t: float, eligible: bool) -> None:
        if eligible != self.eligible:
            if self.eligible:
                self.total += t - self.since
            self.since, self.eligible = t, eligible


@dataclass
class _Pending:
    key: _Key
    mark: float  # key.integral() when this wait began
    idle: float = 0.0  # seconds waited with room, over all its waits so far


@dataclass
class _Preemption:
    victim: str
    by: str | None
    old: dict[str, list[int]]
    ran: float
    restart: dict[str, list[int]] | None = None


def workers_on(spec: JobSpec, placement: Placement) -> dict[str, int]:
    """Workers per node. The log names GPU indices, not workers; a 0-GPU worker cannot be located from them,
    so those are spread evenly over the nodes listed (the first ones get one more). A GPU-sharing job is one
    worker on the one node it lists."""
    if spec.shared:
        return {n: 1 for n in placement}
    if spec.gpus:
        return {n: int(len(g) // spec.gpus) for n, g in placement.items()}
    names = list(placement)
    if not names:
        return {}
    share, extra = divmod(spec.workers, len(names))
    return {n: share + (i < extra) for i, n in enumerate(names)}


class _Replay:
    """Walks the event log instant by instant, keeping free GPUs, CPUs and memory per node and usage per queue."""

    def __init__(self, world: World):
        self.world = world
        self.specs = {j.spec.id: j.spec for j in world.jobs}
        self.nodes = {n.name: _Node(n, cpus=n.cpus, mem=n.memory_gb) for n in world.nodes}
        self.pools: dict[str, list[_Node]] = defaultdict(list)
        for n in self.nodes.values():
            self.pools[n.spec.pool].append(n)
        self.accounted = {
            p: any(n.spec.cpus is not None or n.spec.memory_gb is not None for n in ns) for p, ns in self.pools.items()
        }
        self.hist: dict[str, Counter[int]] = {p: Counter(n.free for n in ns) for p, ns in self.pools.items()}
        self.usage: dict[tuple[str, str], float] = defaultdict(float)  # (queue or ancestor, pool) -> GPUs held
        self.keys: dict[tuple[Any, ...], _Key] = {}
        self.active: dict[str, set[_Key]] = defaultdict(set)  # pool -> keys with pending jobs
        self.pending: dict[str, _Pending] = {}
        self.idle: dict[str, float] = defaultdict(float)  # job -> seconds waited with room, finished waits
        self.running: dict[str, tuple[dict[str, list[int]], float]] = {}  # job -> (placement, start)
        self.dirty: set[str] = set()  # pools whose free room or usage changed at this instant
        self.touched: set[_Key] = set()  # keys that gained or lost a job at this instant
        self.slots: dict[tuple[str, float], int] = {}  # (pool, GPUs a worker) -> workers the free GPUs hold
        self.instant: list[_Preemption] = []
        self.open: dict[str, _Preemption] = {}
        self.started_now: dict[str, dict[str, list[int]]] = {}
        self.waste = PreemptionWaste()

    # ----- free room -----

    def _set_held(self, node: _Node, held: set[int], shared: dict[int, float] | None = None) -> None:
        if node.up:
            self.hist[node.spec.pool][node.free] -= 1
        node.held = held
        if shared is not None:
            node.shared = shared
        if node.up:
            self.hist[node.spec.pool][node.free] += 1

    def _share(self, node: _Node, spec: JobSpec, idx: Sequence[int], sign: int) -> None:
        """A fractional job takes (sign 1) or gives back (-1) its part of the GPU it lists; a MIG job its slice."""
        if spec.mig is not None:
            node.mig[spec.mig] += sign
            return
        shared = dict(node.shared)
        for g in idx:
            part = exact(shared.get(g, 0.0) + sign * spec.gpus)
            if part > 0:
                shared[g] = part
            else:
                shared.pop(g, None)
        self._set_held(node, node.held, shared)

    def node_event(self, name: str, up: bool) -> None:
        node = self.nodes.get(name)
        if node is None or node.up == up:
            return
        self.hist[node.spec.pool][node.free] += 1 if up else -1
        node.up = up
        self.dirty.add(node.spec.pool)

    def _take(self, job: str, spec: JobSpec, placement: Placement, sign: int) -> None:
        per = workers_on(spec, placement)
        for name, idx in placement.items():
            node = self.nodes.get(name)
            if node is None:
                continue
            if spec.shared:
                self._share(node, spec, idx, sign)
            else:
                self._set_held(node, node.held | set(idx) if sign > 0 else node.held - set(idx))
            w = per.get(name, 0)
            if node.cpus is not None:
                node.cpus = exact(node.cpus - sign * w * spec.cpus)
            if node.mem is not None:
                node.mem = exact(node.mem - sign * w * spec.memory_gb)
        queue = self.world.tree.queues.get(spec.queue)
        for q in queue.path if queue is not None else ():
            self.usage[(q.name, spec.pool)] = exact(self.usage[(q.name, spec.pool)] + sign * spec.request)
        self.dirty.add(spec.pool)

    def fits(self, spec: JobSpec) -> bool:
        """Could every worker be placed on the up nodes' free room now (ignoring topology domains)?"""
        if spec.shared:
            return any(n.up and n.room_for_share(spec) for n in self.pools[spec.pool])
        if self.accounted.get(spec.pool) and (spec.cpus or spec.memory_gb):
            room = 0
            for n in self.pools[spec.pool]:
                if n.up:
                    room += workers_per_node(spec, n.free, n.cpus, n.mem)
                    if room >= spec.workers:
                        return True
            return False
        slot = (spec.pool, spec.gpus)
        if slot not in self.slots:
            # Uncapped, unlike workers_per_node: the count is shared by every gang size of this worker size.
            self.slots[slot] = sum(
                c * (int(k // spec.gpus) if spec.gpus else spec.workers)
                for k, c in self.hist.get(spec.pool, Counter()).items()
                if c > 0
            )
        return self.slots[slot] >= spec.workers

    def allowed(self, queue: str, spec: JobSpec) -> bool:
        """Do its queue's limit and every ancestor's leave room for the whole gang?"""
        q = self.world.tree.queues.get(queue)
        return q is not None and all(
            exact(self.usage[(a.name, spec.pool)] + spec.request) <= a.limit_of(spec.pool) for a in q.path
        )

    # ----- pending jobs -----

    def _wait(self, job: str, t: float) -> None:
        spec = self.specs[job]
        shape = (spec.queue, spec.pool, spec.workers, spec.gpus, spec.cpus, spec.memory_gb, spec.mig)
        key = self.keys.get(shape)
        if key is None:
            key = self.keys[shape] = _Key(spec.queue, spec)
        key.count += 1
        self.active[spec.pool].add(key)
        self.touched.add(key)
        self.pending[job] = _Pending(key, key.integral(t))

    def unwait(self, job: str, t: float) -> None:
        p = self.pending.pop(job, None)
        if p is not None:
            p.key.count -= 1
            self.touched.add(p.key)
            self.idle[job] += p.key.integral(t) - p.mark

    # ----- events -----

    def event(self, e: Mapping[str, Any], t: float) -> None:
        job, kind = str(e["job"]), e["event"]
        spec = self.specs.get(job)
        if spec is None:
            return
        if kind == "submitted":
            self._wait(job, t)
        elif kind == "started":
            self.unwait(job, t)
            placement = {str(n): list(g) for n, g in (e.get("nodes") or {}).items()}
            self._take(job, spec, placement, +1)
            self.running[job] = (placement, t)
            self.started_now[job] = placement
            if job in self.open:
                self.open.pop(job).restart = placement
        elif kind in ("preempted", "completed", "failed", "cancelled"):
            run = self.running.pop(job, None)
            if run is not None:
                self._take(job, spec, run[0], -1)
                if kind == "preempted" and e.get("reason") != NODE_DOWN:
                    p = _Preemption(job, e.get("by"), run[0], t - run[1])
                    self.instant.append(p)
                    self.open[job] = p
            if kind == "preempted":
                self._wait(job, t)
            else:
                self.unwait(job, t)  # a job cancelled while pending

    def settle(self, t: float) -> None:
        """The instant is over: what it left holds until the next one."""
        self.slots.clear()
        keys = set(self.touched)
        for pool in self.dirty:
            keys |= self.active[pool]
        for k in keys:
            k.set(t, k.count > 0 and self.allowed(k.queue, k.spec) and self.fits(k.spec))
            if k.count == 0:
                self.active[k.spec.pool].discard(k)
        self.touched.clear()
        self.dirty.clear()
        self._preemptions()
        self.instant.clear()
        self.open.clear()
        self.started_now.clear()

    def _preemptions(self) -> None:
        w = self.waste
        moved_by: dict[str | None, list[_Preemption]] = defaultdict(list)
        for p in self.instant:
            spec = self.specs[p.victim]
            lost = 0.0 if spec.checkpoint else spec.request * p.ran
            w.preemptions += 1
            w.lost_gpu_seconds += lost
            if p.restart is not None:
                w.same_instant += 1
                moved_by[p.by].append(p)
        for by, victims in moved_by.items():
            moved = self._needed(by, victims)
            for p in victims:
                if moved:
                    w.moved += 1
                elif not self.specs[p.victim].checkpoint:
                    w.lost_for_nothing_gpu_seconds += self.specs[p.victim].request * p.ran

    def _needed(self, by: str | None, victims: list[_Preemption]) -> bool:
        """Could `by` not have been placed at this instant had these victims (restarted at it) stayed put?

        The room it would have had: each node's free GPUs as the instant ended, plus what `by` and the victims'
        new runs took, less what the victims held before. No room: the victims only moved to make room for it
        (a gang that needed their node). Room: they were preempted for nothing."""
        spec = self.specs.get(by) if by is not None else None
        placed = self.started_now.get(by) if by is not None else None
        if spec is None or placed is None:
            return False
        delta_gpus: dict[str, set[int]] = defaultdict(set)  # GPUs free in that other instant, beyond today's
        taken_back: dict[str, set[int]] = defaultdict(set)
        delta_cpu: dict[str, float] = defaultdict(float)
        delta_mem: dict[str, float] = defaultdict(float)
        moves = [(spec, placed, +1)]
        for p in victims:
            v = self.specs[p.victim]
            moves += [(v, p.restart or {}, +1), (v, p.old, -1)]
        for s, placement, sign in moves:
            per = workers_on(s, placement)
            for name, idx in placement.items():
                (delta_gpus if sign > 0 else taken_back)[name].update(idx)
                delta_cpu[name] += sign * per.get(name, 0) * s.cpus
                delta_mem[name] += sign * per.get(name, 0) * s.memory_gb
        room = 0
        for n in self.pools[spec.pool]:
            if not n.up:
                continue
            name = n.spec.name
            free = (set(range(n.spec.gpus)) - n.held) | delta_gpus.get(name, set())
            free -= taken_back.get(name, set())
            cpus = None if n.cpus is None else exact(n.cpus + delta_cpu[name])
            mem = None if n.mem is None else exact(n.mem + delta_mem[name])
            room += workers_per_node(spec, len(free), cpus, mem)
            if room >= spec.workers:
                return False
        return True


def analyse(world: World, log: Mapping[str, Any], holds: Iterable[Hold] | None = None) -> Waste:
    """Idle waits, guard holds and preemption waste of one replay (`log` as Simulation.run() returns it).

    Idle wait: a job waits with room when it is pending (after its submission, or after a preemption until its
    restart) while the free room of its pool could place all its workers (each worker its GPUs on one up node,
    and its CPUs and memory where node and job declare them) and its queue's limit, and each ancestor's, leaves
    room for its GPUs. Free room is rebuilt from the `started` events' GPU indices, the releases, and the
    world's node_down/node_up events. Topology domains are ignored: a gang that would start only inside one
    domain still counts as having room when it fits across domains. The state an instant leaves holds until the
    next one, so the sums are exact: request x seconds, per job, summed per queue.

    Preemptions: decided ones only (a node failure is not the policy's doing). A preemption is same-instant
    when its victim starts again at that instant; it only moved when its preemptor (`by`), given the room it
    would have had had its same-instant victims stayed where they were, could not have been placed (see
    _Replay._needed): the victims made way for a gang or a large worker that needed their node. The others
    were lost for nothing. Work lost: each victim's GPUs x the time since its last start, 0 with checkpoint.
    """
    r = _Replay(world)
    events = sorted(log["events"], key=lambda e: float(e["t"]))  # stable: the engine's order within an instant
    nodes = sorted(
        (
            (float(e.at), e.node_up is not None, e.node_down or e.node_up or "")
            for e in world.events
            if e.node_down is not None or e.node_up is not None
        ),
        key=lambda x: x[0],
    )
    i = k = 0
    horizon = float(events[-1]["t"]) if events else 0.0
    while i < len(events) or k < len(nodes):
        t = min(
            float(events[i]["t"]) if i < len(events) else float("inf"), nodes[k][0] if k < len(nodes) else float("inf")
        )
        if t > horizon:
            break
        while k < len(nodes) and nodes[k][0] == t:
            r.node_event(nodes[k][2], nodes[k][1])
            k += 1
        while i < len(events) and float(events[i]["t"]) == t:
            r.event(events[i], t)
            i += 1
        r.settle(t)
    for job in list(r.pending):
        r.unwait(job, horizon)  # still waiting when the log ends
    overall, queues = IdleWait(), dict[str, IdleWait]()
    for spec in r.specs.values():
        q = queues.setdefault(spec.queue, IdleWait())
        secs = r.idle.get(spec.id, 0.0)
        if secs > 0:
            for agg in (overall, q):
                agg.gpu_seconds += spec.request * secs
                agg.preemptible_gpu_seconds += spec.request * secs if spec.preemptible else 0.0
                agg.jobs += 1
                agg.max_seconds = max(agg.max_seconds, secs)
    return Waste(
        overall, dict(sorted(queues.items())), r.waste, count_holds(holds, {s.id: s.queue for s in r.specs.values()})
    )
