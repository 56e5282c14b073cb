"""Quota recommendations: move idle guarantees to queues that waited, then replay both trees to compare them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from quotas import Queue, QueueSpec, QueueTree
from scheduler.sim.inputs import QueueIn, World
from scheduler.sim.metrics import Metrics, Stats, compute
from scheduler.sim.recorded import Demand
from scheduler.sim.runner import Simulation

EPS = 1e-9  # ceil() of a mean that is a whole number up to float noise must not add a GPU


@dataclass(frozen=True)
class Rule:
    """The knobs of the rule in docs/recommend.md."""

    idle_below: float = 0.5  # a queue gives guarantee when it held on average less than this share of its quota
    headroom: float = 1.0  # ... and keeps its mean use times (1 + headroom), rounded up, for its bursts
    # A queue waited (asks for more, never gives) when its jobs waited more GPU-hours than this: every recorded
    # job waits a few milliseconds between submission and admission, which is not a sign of a short guarantee.
    min_waiting_gpu_hours: float = 0.1


@dataclass(frozen=True)
class Change:
    queue: str
    pool: str
    before: int
    after: int
    why: str


@dataclass
class Proposal:
    """The proposed tree (the queue document's entries with quotas changed) and each quota that changed."""

    queues: list[dict[str, Any]]
    changes: list[Change] = field(default_factory=list)

    @property
    def document(self) -> dict[str, Any]:
        """What `corral queue apply -f` takes."""
        return {"queues": self.queues}


def queue_specs(queues: Iterable[Mapping[str, Any]]) -> list[QueueSpec]:
    """Queue documents (as in queues.yaml) as the tree's specs, parsed as a cluster file's queues are."""
    out = []
    for q in queues:
        d = QueueIn.model_validate(q)
        out.append(QueueSpec(d.name, d.parent, dict(d.quota), dict(d.limit), d.weight))
    return out


@dataclass
class _Leaf:
    queue: Queue
    used: float = 0.0  # GPU-hours
    waiting: float = 0.0  # GPU-hours
    floor: int = 0  # largest non-preemptible job
    spare: int = 0  # guarantee it can give
    want: int = 0  # guarantee it can use
    given: int = 0  # moved to it (receivers) or from it (donors) so far
    why: str = ""


def propose(
    queues: Sequence[Mapping[str, Any]],
    capacity: Mapping[str, int],
    demand: Iterable[Demand],
    hours: float,
    rule: Rule | None = None,
) -> Proposal:
    """A tree with the same GPUs guaranteed in every pool, moved from leaf queues whose guarantee sat idle to leaf
    queues whose jobs waited (docs/recommend.md). Inner queues change by the sum of what moved across them.

    Raises QuotaError when the current tree does not fit `capacity`, ValueError when `hours` is not positive.
    """
    if not hours > 0:
        raise ValueError(f"the recorded range must be longer than 0 hours, got {hours}")
    rule = rule or Rule()
    tree = QueueTree(queue_specs(queues), capacity)
    by_key = {(d.queue, d.pool): d for d in demand}
    delta: dict[tuple[str, str], int] = {}
    changes: list[Change] = []
    for pool in sorted(capacity):
        leaves = [_leaf(q, pool, by_key.get((q.name, pool)), hours, rule) for q in tree.leaves]
        for name, n in _moves(tree, pool, leaves).items():
            for up in tree[name].path:
                delta[up.name, pool] = delta.get((up.name, pool), 0) + n
        whys = {x.queue.name: x.why for x in leaves}
        for q in tree.queues.values():
            n = delta.get((q.name, pool), 0)
            if n:
                why = whys.get(q.name) or "the sum of what moved into and out of the queues below it"
                changes.append(Change(q.name, pool, q.quota_of(pool), q.quota_of(pool) + n, why))
    out: list[dict[str, Any]] = []
    for entry in queues:
        new = dict(entry)
        quota = dict(new.get("quota") or {})
        for pool in capacity:
            n = delta.get((new["name"], pool), 0)
            if n:
                quota[pool] = int(quota.get(pool, 0)) + n
        if quota or "quota" in new:
            new["quota"] = quota
        out.append(new)
    QueueTree(queue_specs(out), capacity)  # the rule keeps every check; should it not, fail here, not at apply
    return Proposal(out, changes)


def _leaf(q: Queue, pool: str, d: Demand | None, hours: float, rule: Rule) -> _Leaf:
    leaf = _Leaf(
        q, d.used_gpu_hours if d else 0.0, d.waiting_gpu_hours if d else 0.0, d.largest_nonpreemptible if d else 0
    )
    quota, mean = q.quota_of(pool), leaf.used / hours
    if leaf.waiting > rule.min_waiting_gpu_hours:  # a queue that waited is not idle, whatever it held
        asked = (leaf.used + leaf.waiting) / hours
        leaf.want = max(0, math.ceil(asked - EPS) - quota)
        if math.isfinite(q.limit_of(pool)):
            leaf.want = min(leaf.want, int(q.limit_of(pool)) - quota)
        leaf.why = (
            f"its jobs waited {leaf.waiting:.1f} GPU-hours; it held or asked for {asked:.2f} GPUs on "
            f"average, {quota} guaranteed"
        )
    elif quota > 0 and mean < rule.idle_below * quota:
        keep = min(quota, max(math.ceil(mean * (1 + rule.headroom) - EPS), leaf.floor))
        leaf.spare = quota - keep
        leaf.why = f"held {mean:.2f} GPUs on average of its {quota} guaranteed: {leaf.spare} spare" + (
            f" (it keeps {keep} for its largest non-preemptible job)" if keep == leaf.floor and keep else ""
        )
    return leaf


def _moves(tree: QueueTree, pool: str, leaves: list[_Leaf]) -> dict[str, int]:
    """GPU by GPU: the receiver furthest below its share of what donors can give (shares in proportion to waiting
    GPU-hours) takes one from the donor with the most spare left, as long as no inner queue above the receiver
    (and not above the donor) would go over its limit."""
    donors = [x for x in leaves if x.spare > 0]
    receivers = [x for x in leaves if x.want > 0]
    total, asked = sum(x.spare for x in donors), sum(x.waiting for x in receivers)
    if not total or not asked:
        return {}
    target = {x.queue.name: total * x.waiting / asked for x in receivers}
    room = {q.name: q.limit_of(pool) - q.quota_of(pool) for q in tree.queues.values() if not q.is_leaf}
    net = dict.fromkeys(room, 0)  # GPUs of guarantee each inner queue gained so far
    while _move_one(receivers, donors, target, room, net):
        pass
    return {x.queue.name: x.given if x.want else -x.given for x in leaves if x.given}


def _move_one(
    receivers: list[_Leaf],
    donors: list[_Leaf],
    target: Mapping[str, float],
    room: Mapping[str, float],
    net: dict[str, int],
) -> bool:
    """Move one GPU of guarantee as _moves says; False when no move is possible."""
    for r in sorted(
        (x for x in receivers if x.given < x.want), key=lambda x: (x.given - target[x.queue.name], x.queue.name)
    ):
        for d in sorted((x for x in donors if x.given < x.spare), key=lambda x: (x.given - x.spare, x.queue.name)):
            shared = {id(a) for a in d.queue.path} & {id(a) for a in r.queue.path}
            up = [a for a in r.queue.path[1:] if id(a) not in shared]
            if any(net[a.name] + 1 > room[a.name] for a in up):
                continue
            for a in up:
                net[a.name] += 1
            for a in d.queue.path[1:]:
                if id(a) not in shared:
                    net[a.name] -= 1
            r.given += 1
            d.given += 1
            return True
    return False


@dataclass(frozen=True)
class Outcome:
    """One leaf queue in the replays under the current and the proposed tree (seconds, GPU-hours)."""

    queue: str
    jobs: int
    mean_wait_before: float
    mean_wait_after: float
    p95_wait_before: float
    p95_wait_after: float
    gpu_hours_before: float
    gpu_hours_after: float


def replay(world: World) -> Metrics:
    """The world's jobs replayed under the corral policy, and their metrics."""
    log = Simulation(world, "corral", log_fair_share=False).run()
    return compute(world.jobs, log, sum(n.gpus for n in world.nodes))


def compare(world: World, proposed: Sequence[Mapping[str, Any]]) -> list[Outcome]:
    """Replay the world's jobs under its tree and under `proposed`; per leaf queue that had jobs, both results."""
    before = replay(world)
    after = replay(replace(world, tree=QueueTree(queue_specs(proposed), world.tree.capacity)))
    empty = Stats()
    out = []
    for q in sorted(before.queues.keys() | after.queues.keys()):
        b, a = before.queues.get(q, empty), after.queues.get(q, empty)
        out.append(
            Outcome(
                q,
                max(a.jobs, b.jobs),
                b.mean_wait,
                a.mean_wait,
                b.p95_wait,
                a.p95_wait,
                b.gpu_seconds / 3600,
                a.gpu_seconds / 3600,
            )
        )
    return out
