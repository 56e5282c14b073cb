"""The queue tree: leaf queues (teams, projects) under inner queues (departments), validated as a whole."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

UNLIMITED = math.inf


class QuotaError(ValueError):
    """A queue tree that cannot be applied; `problems` lists (where, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{where}: {what}" for where, what in problems))


@dataclass(frozen=True)
class QueueSpec:
    """One queue as declared: GPUs per pool it is guaranteed (quota), may use at most (limit), and its weight.

    `weight` is one number for every pool, or a per-pool mapping (pools not named get `default_weight`).
    """

    name: str
    parent: str | None = None
    quota: Mapping[str, int] = field(default_factory=dict)
    limit: Mapping[str, int] = field(default_factory=dict)
    weight: float | Mapping[str, float] = 1.0
    default_weight: float = 1.0


@dataclass
class Queue:
    """A validated queue, linked into its tree."""

    name: str
    parent: Queue | None
    quota: dict[str, int]
    limit: dict[str, float]
    weight: dict[str, float]
    default_weight: float
    children: list[Queue] = field(default_factory=list)
    # The queue itself first, then its parent, up to the top level: read on every admission.
    path: tuple[Queue, ...] = ()

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def quota_of(self, pool: str) -> int:
        return self.quota.get(pool, 0)

    def limit_of(self, pool: str) -> float:
        return self.limit.get(pool, UNLIMITED)

    def weight_of(self, pool: str) -> float:
        return self.weight.get(pool, self.default_weight)

    def __repr__(self) -> str:
        return f"Queue({self.name})"


class QueueTree:
    """All queues, validated against the pools they name; construction raises QuotaError and keeps nothing."""

    def __init__(self, specs: Iterable[QueueSpec], capacity: Mapping[str, int]):
        specs = list(specs)
        problems = validate(specs, capacity)
        if problems:
            raise QuotaError(problems)
        self.capacity = dict(capacity)
        self.queues: dict[str, Queue] = {}
        for s in specs:
            weight = dict(s.weight) if isinstance(s.weight, Mapping) else {}
            default = s.default_weight if isinstance(s.weight, Mapping) else float(s.weight)
            self.queues[s.name] = Queue(
                name=s.name,
                parent=None,
                quota=dict(s.quota),
                limit={p: float(v) for p, v in s.limit.items()},
                weight=weight,
                default_weight=default,
            )
        for s in specs:
            if s.parent is not None:
                q, parent = self.queues[s.name], self.queues[s.parent]
                q.parent = parent
                parent.children.append(q)
        self.top: list[Queue] = [q for q in self.queues.values() if q.parent is None]
        # Children in name order, so every walk of the tree is deterministic.
        for q in self.queues.values():
            q.children.sort(key=lambda c: c.name)
        self.top.sort(key=lambda c: c.name)
        for q in self.queues.values():
            chain = [q]
            while (up := chain[-1].parent) is not None:
                chain.append(up)
            q.path = tuple(chain)
        self.leaves: list[Queue] = sorted((q for q in self.queues.values() if q.is_leaf), key=lambda q: q.name)
        self.specs = specs
        self._leaves_under: dict[str, list[str]] = {}

    def __getitem__(self, name: str) -> Queue:
        return self.queues[name]

    def __contains__(self, name: object) -> bool:
        return name in self.queues

    def leaves_under(self, name: str) -> list[str]:
        """Names of the leaf queues in a queue's subtree (itself, for a leaf)."""
        found = self._leaves_under.get(name)
        if found is None:
            stack, found = [self.queues[name]], []
            while stack:
                q = stack.pop()
                if q.is_leaf:
                    found.append(q.name)
                stack.extend(q.children)
            self._leaves_under[name] = found
        return found

    def branch(self, victim: Queue, beneficiary: Queue) -> Queue:
        """The highest ancestor of `victim` (or itself) that is not an ancestor of `beneficiary`."""
        above = set(map(id, beneficiary.path))
        branch = victim
        for q in victim.path:
            if id(q) in above:
                break
            branch = q
        return branch


def validate(specs: list[QueueSpec], capacity: Mapping[str, int]) -> list[tuple[str, str]]:
    """Every reason this tree cannot be applied to pools of `capacity` GPUs; empty when it can."""
    problems: list[tuple[str, str]] = []
    by_name: dict[str, QueueSpec] = {}
    for i, s in enumerate(specs):
        where = f"queues[{i}] ({s.name})"
        if not s.name or not isinstance(s.name, str):
            problems.append((f"queues[{i}].name", "a queue needs a non-empty name"))
            continue
        if s.name in by_name:
            problems.append((f"{where}.name", f"queue {s.name!r} is declared twice"))
        by_name[s.name] = s
        for key, values in (("quota", s.quota), ("limit", s.limit)):
            for pool, v in values.items():
                if pool not in capacity:
                    problems.append((f"{where}.{key}.{pool}", f"pool {pool!r} does not exist"))
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    problems.append((f"{where}.{key}.{pool}", f"must be a whole number of GPUs >= 0, got {v!r}"))
        weights = s.weight.items() if isinstance(s.weight, Mapping) else [("", s.weight)]
        for pool, w in weights:
            wf = f"{where}.weight" + (f".{pool}" if pool else "")
            if pool and pool not in capacity:
                problems.append((wf, f"pool {pool!r} does not exist"))
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                problems.append((wf, f"must be a number >= 0, got {w!r}"))
        for pool, lim in s.limit.items():
            quota = s.quota.get(pool, 0)
            if isinstance(lim, int) and isinstance(quota, int) and lim < quota:
                problems.append((f"{where}.limit.{pool}", f"limit {lim} is below the queue's quota {quota}"))
    if problems:
        return problems
    for i, s in enumerate(specs):
        if s.parent is None:
            continue
        if s.parent not in by_name:
            problems.append((f"queues[{i}] ({s.name}).parent", f"parent queue {s.parent!r} does not exist"))
            continue
        seen: set[str] = {s.name}
        q: str | None = s.parent
        while q is not None:
            if q in seen:
                problems.append((f"queues[{i}] ({s.name}).parent", f"parents form a cycle through {q!r}"))
                break
            seen.add(q)
            q = by_name[q].parent if q in by_name else None
    if problems:
        return problems
    children: dict[str | None, list[QueueSpec]] = {}
    for s in specs:
        children.setdefault(s.parent, []).append(s)
    for pool, cap in capacity.items():
        for parent, kids in children.items():
            total = sum(k.quota.get(pool, 0) for k in kids)
            if parent is None:
                if total > cap:
                    names = ", ".join(f"{k.name}={k.quota.get(pool, 0)}" for k in kids if k.quota.get(pool))
                    problems.append(
                        (
                            f"quota.{pool}",
                            f"top-level quotas add up to {total} GPUs ({names}), "
                            f"more than the pool's capacity of {cap}",
                        )
                    )
            else:
                own = by_name[parent].quota.get(pool, 0)
                if total > own:
                    names = ", ".join(f"{k.name}={k.quota.get(pool, 0)}" for k in kids if k.quota.get(pool))
                    problems.append(
                        (
                            f"{parent}.quota.{pool}",
                            f"children's quotas add up to {total} GPUs ({names}), more than {parent}'s quota of {own}",
                        )
                    )
    return problems
