"""Unallocated GPUs while jobs wait (fragmentation), from an event log and its cluster: free capacity, fractions of
shared GPUs included, integrated over the time in which a job of the pool waits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sortedcontainers import SortedList

from scheduler.engine import NodeSpec
from scheduler.sim.inputs import EventIn, SimJob
from scheduler.sim.metrics import RELEASES

# A `started` event of a fractional job names its one GPU in `nodes` and the part of it the job holds here
# (SIMULATOR.md extension, docs/observability.md); without it each GPU index listed is held whole.
FRACTION = "fraction"
EPS = 1e-9  # float sums of fractions (0.1 + 0.2 + 0.7) must still read as a full GPU


@dataclass
class PoolFragmentation:
    """One pool's integrals over the time in which at least one of its jobs waits (seconds, GPU-seconds)."""

    wait_seconds: float = 0.0  # time during which a job of this pool waits
    unallocated_gpu_seconds: float = 0.0  # free GPUs (whole and fractions of shared ones) x that time
    partial_gpu_seconds: float = 0.0  # the part of it that is fractions left on GPUs shared by running jobs
    capacity_gpu_seconds: float = 0.0  # the pool's GPUs on nodes that are up x that time
    stranded_gpu_seconds: float = 0.0  # the part of it while a waiting job asks for no more than is unallocated


@dataclass
class Fragmentation:
    """Unallocated GPUs while jobs wait, over a whole replay; per pool in `pools` (see compute())."""

    wait_seconds: float = 0.0  # time during which at least one job waits, in any pool
    unallocated_gpu_seconds: float = 0.0
    partial_gpu_seconds: float = 0.0
    capacity_gpu_seconds: float = 0.0
    stranded_gpu_seconds: float = 0.0
    pools: dict[str, PoolFragmentation] = field(default_factory=dict)

    @property
    def mean_unallocated(self) -> float:
        """Unallocated GPUs of the pools where jobs wait, on average over the time in which any job waits."""
        return self.unallocated_gpu_seconds / self.wait_seconds if self.wait_seconds else 0.0

    @property
    def unallocated_share(self) -> float:
        """Unallocated GPU-seconds over the capacity of the pools where jobs wait, over the same time."""
        return self.unallocated_gpu_seconds / self.capacity_gpu_seconds if self.capacity_gpu_seconds else 0.0

    @property
    def partial_share(self) -> float:
        """The part of the unallocated GPU-seconds that was fractions of shared GPUs (0 when nothing was free)."""
        return self.partial_gpu_seconds / self.unallocated_gpu_seconds if self.unallocated_gpu_seconds else 0.0

    @property
    def stranded_share(self) -> float:
        """The part of the unallocated GPU-seconds during which some waiting job asked for no more GPUs than were
        unallocated in its pool: it waited on how the free room was spread, or on a rule (quota, limit, guard)."""
        return self.stranded_gpu_seconds / self.unallocated_gpu_seconds if self.unallocated_gpu_seconds else 0.0


def held(e: Mapping[str, Any]) -> list[tuple[str, int, float]]:
    """(node, GPU index, amount) a `started` event takes: each GPU listed whole, or its fraction (one GPU)."""
    nodes: Mapping[str, Sequence[int]] = e.get("nodes") or {}
    part = e.get(FRACTION)
    amount = 1.0 if part is None else float(part)
    return [(n, int(g), amount) for n, gpus in nodes.items() for g in gpus]


class _Pool:
    """Live allocation of one pool: amount held per GPU of each node, which nodes are up, who waits. The sums over
    up nodes are kept current by every change, so that a long replay reads them per instant at no cost."""

    def __init__(self, nodes: Iterable[NodeSpec]):
        self.gpus = {n.name: n.gpus for n in nodes}
        self.up = set(self.gpus)
        self.used: dict[tuple[str, int], float] = {}  # (node, index) -> amount held, > 0
        self.waiting: set[str] = set()
        self.asks: SortedList = SortedList()  # GPUs the waiting jobs whose request is known ask for
        self.capacity = sum(self.gpus.values())  # GPUs of up nodes
        self.held = 0.0  # held on up nodes (a GPU counts at most 1)
        self.partial = 0.0  # free parts of GPUs on up nodes that running jobs share

    @staticmethod
    def _terms(a: float) -> tuple[float, float]:
        return min(1.0, a), (1.0 - a if EPS < a < 1.0 - EPS else 0.0)

    def free(self) -> tuple[float, float]:
        """(unallocated, the part of it on GPUs that running jobs share) on nodes that are up."""
        return max(0.0, self.capacity - self.held), max(0.0, self.partial)

    def take(self, parts: Iterable[tuple[str, int, float]], sign: float) -> None:
        for n, g, a in parts:
            before = self.used.get((n, g), 0.0)
            after = before + sign * a
            if after > EPS:
                self.used[(n, g)] = after
            else:
                self.used.pop((n, g), None)
                after = 0.0
            if n in self.up:
                (h0, p0), (h1, p1) = self._terms(before), self._terms(after)
                self.held += h1 - h0
                self.partial += p1 - p0

    def set_up(self, name: str, up: bool) -> None:
        (self.up.add if up else self.up.discard)(name)
        self.capacity = sum(self.gpus[n] for n in self.up)
        terms = [self._terms(a) for (n, _), a in self.used.items() if n in self.up]
        self.held, self.partial = sum(h for h, _ in terms), sum(p for _, p in terms)


def _pool_of_jobs(
    log: Mapping[str, Any], node_pool: Mapping[str, str], jobs: Sequence[SimJob] | None
) -> dict[str, str | None]:
    """Each job's pool: its spec's when the jobs are given; else the pool of the nodes it first started on
    (None: it never started in this log, so its pool is unknown)."""
    if jobs:
        return {j.spec.id: j.spec.pool for j in jobs}
    out: dict[str, str | None] = {}
    for e in log["events"]:
        if e["event"] == "started" and out.get(e["job"]) is None:
            out[e["job"]] = next((node_pool.get(n) for n in e.get("nodes") or {}), None)
        else:
            out.setdefault(e["job"], None)
    return out


def compute(
    log: Mapping[str, Any],
    nodes: Sequence[NodeSpec],
    jobs: Sequence[SimJob] | None = None,
    node_events: Sequence[EventIn] = (),
) -> Fragmentation:
    """Unallocated GPUs while jobs wait, from the event log of SIMULATOR.md and the cluster's nodes.

    A job waits from its `submitted` event (or a `preempted` one) until it starts, is cancelled or rejected. At
    every moment, for each pool in which at least one job waits, its unallocated GPUs are its up nodes' GPUs less
    what running jobs hold (a fractional job its fraction of one GPU); the partial part is what is left on GPUs
    that running jobs share but do not fill; the stranded part is what was unallocated while some waiting job
    (of the given `jobs`) asked for no more than that. The state an instant leaves holds until the next instant,
    so the integrals are exact. `jobs` (the replayed jobs) give each job's pool and request; without them a job's
    pool is the one it started in, a job that never started counts as waiting in every pool, and nothing counts
    as stranded. `node_events`: the scenario's node_down / node_up events (a trace has none); a down node's GPUs
    are neither capacity nor free.
    """
    node_pool = {n.name: n.pool for n in nodes}
    by_pool: dict[str, list[NodeSpec]] = defaultdict(list)
    for n in nodes:
        by_pool[n.pool].append(n)
    pools = {p: _Pool(ns) for p, ns in sorted(by_pool.items())}
    pool_of = _pool_of_jobs(log, node_pool, jobs)
    # What each waiting job asks for, where known (a MIG slice is not GPUs of the node: it never fits them).
    asks = {j.spec.id: float(j.spec.request) for j in jobs or () if j.spec.mig is None}
    holding: dict[str, list[tuple[str, int, float]]] = {}
    out = Fragmentation(pools={p: PoolFragmentation() for p in pools})
    changes: list[tuple[float, int, Any]] = [
        (float(e.at), 0, e) for e in node_events if e.node_down is not None or e.node_up is not None
    ]
    changes += [(float(e["t"]), 1, e) for e in log["events"]]
    changes.sort(key=lambda c: (c[0], c[1]))  # stable: the engine's order within an instant is kept
    last: float | None = None
    i = 0
    while i < len(changes):
        t = changes[i][0]
        if last is not None and t > last:
            _accumulate(out, pools, t - last)
        while i < len(changes) and changes[i][0] == t:
            _apply(changes[i], pools, pool_of, node_pool, holding, asks)
            i += 1
        last = t
    return out


def _apply(
    change: tuple[float, int, Any],
    pools: Mapping[str, _Pool],
    pool_of: Mapping[str, str | None],
    node_pool: Mapping[str, str],
    holding: dict[str, list[tuple[str, int, float]]],
    asks: Mapping[str, float],
) -> None:
    _, kind, e = change
    if kind == 0:
        name = e.node_down if e.node_down is not None else e.node_up
        p = pools.get(node_pool.get(name, ""))
        if p is not None:
            p.set_up(name, e.node_down is None)
        return
    job, what = e["job"], e["event"]
    home = pool_of.get(job)
    mine = pools.get(home) if home is not None else None
    targets = [mine] if mine is not None else list(pools.values())
    if what in ("submitted", "preempted"):
        for p in targets:
            if job not in p.waiting:
                p.waiting.add(job)
                if job in asks:
                    p.asks.add(asks[job])
    elif what == "started" or what in RELEASES or what == "rejected":
        for p in targets:
            if job in p.waiting:
                p.waiting.discard(job)
                if job in asks:
                    p.asks.remove(asks[job])
    if what == "started":
        parts = held(e)
        holding[job] = parts
        for node in {n for n, _, _ in parts}:
            if node in node_pool:
                pools[node_pool[node]].take([x for x in parts if x[0] == node], 1.0)
    elif what in RELEASES and job in holding:
        parts = holding.pop(job)
        for node in {n for n, _, _ in parts}:
            if node in node_pool:
                pools[node_pool[node]].take([x for x in parts if x[0] == node], -1.0)


def _accumulate(out: Fragmentation, pools: Mapping[str, _Pool], dt: float) -> None:
    any_waits = False
    for name, p in pools.items():
        if not p.waiting:
            continue
        any_waits = True
        free, partial = p.free()
        cap = p.capacity
        pf = out.pools[name]
        pf.wait_seconds += dt
        pf.unallocated_gpu_seconds += free * dt
        pf.partial_gpu_seconds += partial * dt
        pf.capacity_gpu_seconds += cap * dt
        out.unallocated_gpu_seconds += free * dt
        out.partial_gpu_seconds += partial * dt
        out.capacity_gpu_seconds += cap * dt
        if p.asks and p.asks[0] <= free + EPS:
            pf.stranded_gpu_seconds += free * dt
            out.stranded_gpu_seconds += free * dt
    if any_waits:
        out.wait_seconds += dt
