"""Hypothesis strategies for the property tests, and the spec's rules recomputed independently of the engine."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from quotas import QueueSpec, QueueTree
from quotas.tree import Queue
from scheduler.engine import Job, JobSpec, JobState, NodeSpec, Settings
from scheduler.engine.model import Amounts
from scheduler.sim.inputs import EventIn, SimJob, World
from tests.factories import cancel, job, node, node_down, node_up, queue, tree, world

NO_GUARD = 1e9  # starvation_timeout so large that no reservation ever exists within a run
# Hypothesis settings of every property test: reproducible examples (CI must not flake), no deadline on a machine
# shared with other work.
PROPERTY = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
POOLS = ("a100", "h100", "l4")


# ===================================================================== strategies


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeSpec]:
    """1-3 pools of 1-6 nodes with 1-8 GPUs each (uniform or mixed), optional CPUs/memory, optional domains."""
    out: list[NodeSpec] = []
    for pool in POOLS[: draw(st.integers(1, 3))]:
        count = draw(st.integers(1, 6))
        uniform = draw(st.booleans())
        g = draw(st.integers(1, 8))
        cpus = draw(st.sampled_from([None, None, 8.0, 32.0]))
        mem = draw(st.sampled_from([None, None, 64.0, 256.0]))
        n_domains = draw(st.integers(0, min(3, count)))
        for i in range(count):
            gpus = g if uniform else draw(st.integers(1, 8))
            domain = None
            if n_domains and draw(st.integers(0, 4)) > 0:  # most nodes in a domain, some outside any
                domain = f"d{draw(st.integers(0, n_domains - 1))}"
            out.append(node(f"{pool}-{i}", pool, gpus, cpus, mem, domain))
    return out


def _capacity(node_list: list[NodeSpec]) -> dict[str, int]:
    cap: dict[str, int] = defaultdict(int)
    for n in node_list:
        cap[n.pool] += n.gpus
    return dict(cap)


@st.composite
def queue_specs(draw: st.DrawFn, cap: Mapping[str, int]) -> list[QueueSpec]:
    """1-2 levels; quotas that validate (children within parent, top level within capacity), limits >= quota."""
    pools = sorted(cap)
    weights = st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.0])

    def quota_limit(room: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int], float | dict[str, float]]:
        quota: dict[str, int] = {}
        limit: dict[str, int] = {}
        for p in pools:
            if room[p] > 0 and draw(st.booleans()):
                quota[p] = draw(st.integers(0, room[p]))
            if draw(st.integers(0, 3)) == 0:
                limit[p] = quota.get(p, 0) + draw(st.integers(0, cap[p]))
        weight: float | dict[str, float] = draw(weights)
        if len(pools) > 1 and draw(st.integers(0, 4)) == 0:
            weight = {p: draw(weights) for p in pools if draw(st.booleans())}
        return quota, limit, weight

    specs: list[QueueSpec] = []
    top_room = dict(cap)
    for i in range(draw(st.integers(1, 3))):
        name = f"q{i}"
        quota, limit, weight = quota_limit(top_room)
        for p, v in quota.items():
            top_room[p] -= v
        specs.append(queue(name, None, quota, limit, weight))
        if draw(st.integers(0, 2)) > 0:
            child_room = {p: quota.get(p, 0) for p in pools}
            for k in range(draw(st.integers(1, 3))):
                cq, cl, cw = quota_limit(child_room)
                for p, v in cq.items():
                    child_room[p] -= v
                specs.append(queue(f"{name}{'abc'[k]}", name, cq, cl, cw))
    return specs


def can_ever_run(spec: JobSpec, t: QueueTree, node_list: list[NodeSpec]) -> bool:
    """Whether the job could start on its empty pool with every node up (Jobs: anything else is rejected)."""
    if spec.queue not in t or not t[spec.queue].is_leaf or spec.pool not in {n.pool for n in node_list}:
        return False
    q = t[spec.queue]
    if any(spec.request > a.limit_of(spec.pool) for a in q.path):
        return False
    if not spec.preemptible and spec.request > q.quota_of(spec.pool):
        return False  # the guarantee rule never lets it start
    every = {
        n.name: (
            float(n.gpus),
            math.inf if n.cpus is None else n.cpus,
            math.inf if n.memory_gb is None else n.memory_gb,
        )
        for n in node_list
        if n.pool == spec.pool
    }
    return workers_that_fit(spec, every) >= spec.workers


@dataclass
class Case:
    world: World
    guard: bool  # a finite starvation_timeout: reservations may exist, so work conservation is not asserted


@st.composite
def cases(draw: st.DrawFn, guard: bool | None = None, max_jobs: int = 24) -> Case:
    guarded = draw(st.booleans()) if guard is None else guard
    node_list = draw(clusters())
    cap = _capacity(node_list)
    t = tree(draw(queue_specs(cap)), node_list)
    leaves = [q.name for q in t.leaves]
    inner = [q.name for q in t.queues.values() if not q.is_leaf]
    pools = sorted(cap)
    jobs: list[SimJob] = []
    for i in range(draw(st.integers(0, max_jobs))):
        q = draw(st.sampled_from(inner)) if inner and draw(st.integers(0, 19)) == 0 else draw(st.sampled_from(leaves))
        spec = job(
            f"j{i}",
            q,
            draw(st.sampled_from(pools)),
            workers=draw(st.integers(1, 3)),
            gpus=draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3, 4, 4, 8])),
            cpus=draw(st.sampled_from([0.0, 0.0, 0.0, 2.0, 8.0])),
            memory_gb=draw(st.sampled_from([0.0, 0.0, 0.0, 16.0, 64.0])),
            priority=draw(st.integers(0, 2)),
            preemptible=draw(st.integers(0, 3)) > 0,
            checkpoint=draw(st.integers(0, 4)) == 0,
        )
        max_runtime = draw(st.sampled_from([None, None, None, 10.0, 40.0]))
        jobs.append(SimJob(spec, float(draw(st.integers(0, 40))), float(draw(st.integers(1, 120))), max_runtime))
    events: list[EventIn] = []
    names = [n.name for n in node_list]
    for _ in range(draw(st.integers(0, 6))):
        at = float(draw(st.integers(0, 90)))
        kind = draw(st.sampled_from(["cancel", "down", "up", "up"]))
        if kind == "cancel" and jobs:
            events.append(cancel(at, draw(st.sampled_from(jobs)).spec.id))
        elif kind == "down":
            events.append(node_down(at, draw(st.sampled_from(names))))
        else:
            events.append(node_up(at, draw(st.sampled_from(names))))
    timeout = float(draw(st.sampled_from([5, 20, 60]))) if guarded else NO_GUARD
    s = Settings(min_runtime=float(draw(st.sampled_from([0, 0, 0, 5, 15]))), starvation_timeout=timeout)
    return Case(world(node_list, t, jobs, events, s), guarded)


def describe(w: World) -> str:
    """A compact, copy-pasteable description of a world (printed for failing examples)."""
    lines = [f"settings={w.settings}", "nodes:"]
    lines += [f"  {n}" for n in w.nodes]
    lines.append("queues:")
    lines += [f"  {s}" for s in w.tree.specs]
    lines.append("jobs:")
    lines += [f"  submit={j.submit:g} duration={j.duration:g} max_runtime={j.max_runtime} {j.spec}" for j in w.jobs]
    lines.append("events:")
    lines += [f"  {e.model_dump(exclude_none=True)}" for e in w.events]
    return "\n".join(lines)


# ===================================================================== reference rules (recomputed from the spec)


def _fits(cap: float, need: float) -> float:
    """How many workers needing `need` fit into `cap` of one resource (inf when it needs none)."""
    if need <= 0:
        return math.inf
    if math.isinf(cap):
        return math.inf
    return max(0.0, cap // need)


def workers_that_fit(spec: JobSpec, free: Mapping[str, tuple[float, float, float]]) -> float:
    """Workers of `spec` that the free resources can hold. Workers are identical, so a node holds
    min(free GPUs / gpus, free CPUs / cpus, free memory / memory) of them independently of the others:
    the gang fits (anywhere in the pool) exactly when the sum reaches `workers`."""
    total = 0.0
    for g, c, m in free.values():
        total += min(_fits(g, spec.gpus), _fits(c, spec.cpus), _fits(m, spec.memory_gb))
    return total


def best_fit(room: Mapping[str, tuple[float, float, float]], spec: JobSpec) -> list[str] | None:
    """Placement, best fit: each worker in turn on the fitting node with the fewest free GPUs, then lowest name."""
    left = {n: list(r) for n, r in room.items()}
    chosen: list[str] = []
    for _ in range(spec.workers):
        fit = [(r[0], n) for n, r in left.items() if r[0] >= spec.gpus and r[1] >= spec.cpus and r[2] >= spec.memory_gb]
        if not fit:
            return None
        _, n = min(fit)
        left[n][0] -= spec.gpus
        left[n][1] -= spec.cpus
        left[n][2] -= spec.memory_gb
        chosen.append(n)
    return chosen


def reference_place(
    spec: JobSpec, room: Mapping[str, tuple[float, float, float]], domains: Mapping[str, list[str]]
) -> list[str] | None:
    """Placement, topology: a gang of more than one worker goes into one domain if any can hold it (the one with
    the fewest free GPUs, then the lowest name), best fit inside it; otherwise best fit across the pool."""
    if spec.workers > 1 and domains:
        fitting = []
        for d, members in sorted(domains.items()):
            sub = {n: room[n] for n in members if n in room}
            chosen = best_fit(sub, spec)
            if chosen is not None:
                fitting.append((sum(r[0] for r in sub.values()), d, chosen))
        if fitting:
            return min(fitting, key=lambda f: (f[0], f[1]))[2]
    return best_fit(room, spec)


def leaf_demand(jobs: list[Job], pool: str) -> Amounts:
    """usage + pending GPUs per leaf (uncapped)."""
    d = Amounts()
    for j in jobs:
        if j.spec.pool == pool and j.state in (JobState.RUNNING, JobState.PENDING):
            d[j.spec.queue] += j.request
    return d


def capped_demand(t: QueueTree, pool: str, leaf: Mapping[str, float]) -> dict[str, float]:
    """demand(Q, p) capped at limit. SCHEDULING.md's "usage plus GPUs requested by pending jobs in the subtree,
    capped at limit" is read with every queue of the subtree capped at its own limit as well, as
    docs/scheduling.md states: "For a department, it is the sum of its teams' demands, capped at the department's
    limit" (GPUs a team may never use are no demand of its department)."""
    out: dict[str, float] = {}

    def walk(q: Queue) -> float:
        d = float(leaf.get(q.name, 0)) if q.is_leaf else sum(walk(c) for c in q.children)
        out[q.name] = min(d, q.limit_of(pool))
        return out[q.name]

    for q in t.top:
        walk(q)
    return out


def reference_split(children: list[Queue], share: float, pool: str, demand: Mapping[str, float]) -> dict[str, float]:
    """Steps 2-3 of the fair share, literally: guarantees (scaled down if they exceed the parent's share), then
    rounds of weighted splitting of the rest among children below min(limit, demand), until R is 0 or none can
    take more. Zero-weight children (docs/scheduling.md) share equally what weighted children leave."""
    g = {c.name: min(float(c.quota_of(pool)), demand[c.name]) for c in children}
    total = sum(g.values())
    if total > share:
        return {n: v * share / total for n, v in g.items()}
    out = dict(g)
    rest = share - total
    cap = {c.name: min(c.limit_of(pool), demand[c.name]) for c in children}
    while rest > 1e-12:
        open_ = [c for c in children if out[c.name] < cap[c.name] - 1e-12]
        weight = {c.name: c.weight_of(pool) for c in open_ if c.weight_of(pool) > 0}
        if not weight:
            weight = {c.name: 1.0 for c in open_}
        open_ = [c for c in open_ if c.name in weight]
        w = sum(weight.values())
        if not open_ or w <= 0:
            break
        given = 0.0
        for c in open_:
            take = min(rest * weight[c.name] / w, cap[c.name] - out[c.name])
            out[c.name] += take
            given += take
        rest -= given
    return out


def reference_shares(t: QueueTree, pool: str, capacity: float, demand: Mapping[str, float]) -> dict[str, float]:
    shares: dict[str, float] = {}
    todo: list[tuple[list[Queue], float]] = [(t.top, float(capacity))]
    while todo:
        children, share = todo.pop()
        part = reference_split(children, share, pool, demand)
        shares.update(part)
        todo += [(c.children, part[c.name]) for c in children if c.children]
    return shares
