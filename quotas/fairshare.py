"""Weighted water-filling fair share, per pool, top-down through the queue tree (SCHEDULING.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from quotas.tree import Queue, QueueTree

EPS = 1e-9


# A child as the water-filling sees it: name, quota and weight in one pool.
Kid = tuple[str, float, float]


def split(kids: Sequence[Kid], share: float, demand: Mapping[str, float], out: dict[str, float]) -> None:
    """Split a parent's `share` among its children into `out`: guarantees first, then the rest by weight,
    each child up to its demand (already capped at its limit)."""
    given = [min(quota, demand[name]) for name, quota, _ in kids]
    total = sum(given)
    if total > share + EPS:
        # Capacity was lost: every guarantee shrinks in proportion.
        scale = share / total if total > 0 else 0.0
        for (name, _, _), g in zip(kids, given, strict=True):
            out[name] = g * scale
        return
    rest = share - total
    # Children still below their cap: those with a weight first; zero-weight ones share what they leave.
    open_ = [
        (i, demand[kid[0]] - g, kid[2])
        for i, (kid, g) in enumerate(zip(kids, given, strict=True))
        if demand[kid[0]] - g > EPS
    ]
    rest = _pour([o for o in open_ if o[2] > 0], rest, given, kids)
    if rest > EPS:
        _pour([(i, room, 1.0) for i, room, w in open_ if w <= 0], rest, given, kids)
    for (name, _, _), g in zip(kids, given, strict=True):
        out[name] = g


def _pour(open_: list[tuple[int, float, float]], rest: float, given: list[float], kids: Sequence[Kid]) -> float:
    """Water-fill `rest` over (child index, room, weight) in proportion to weight; returns what is left.

    Children whose room is under the water level take their room; every other child gets weight x level, from one
    level computed once (an exact sum of their weights), not from what the children before it left. So two children
    of equal weight and demand get bit-identical shares, whatever their order and whatever the history of
    incremental updates (PoolShares skips splits that cannot move a share in exact arithmetic): shares that differ
    in the last bit would break a tie of ratios that the spec breaks by name, and an engine rebuilt after a restart
    would break it otherwise than one that never restarted."""
    open_.sort(key=lambda o: (o[1] / o[2], kids[o[0]][0]))
    weight_left = sum(w for _, _, w in open_)
    for k, (i, room, w) in enumerate(open_):
        if rest <= EPS or weight_left <= 0:
            break
        if room <= rest * w / weight_left + EPS:
            given[i] += room
            rest -= room
            weight_left -= w
            continue
        level = rest / math.fsum(wj for _, _, wj in open_[k:])
        for j, _, wj in open_[k:]:
            given[j] += wj * level
        return 0.0
    return rest


def fair_shares(tree: QueueTree, pool: str, capacity: float, leaf_demand: Mapping[str, float]) -> dict[str, float]:
    """fairshare(Q, pool) for every queue, given the pool's up capacity and each leaf's demand (usage + pending)."""
    ps = PoolShares(tree, pool, capacity)
    for leaf, d in leaf_demand.items():
        ps.add_demand(leaf, d)
    return ps.shares()


class PoolShares:
    """fairshare(Q, pool) kept current as leaf demands and capacity change.

    Demands are kept by deltas up the tree. A change re-runs the water-filling only when it can move a
    share: when it changes a queue's guarantee term min(quota, demand), or its cap min(limit, demand) where
    that cap binds. A busy cluster's queues mostly want far more than their share, so most changes cannot.
    """

    def __init__(self, tree: QueueTree, pool: str, capacity: float):
        self.tree, self.pool, self.capacity = tree, pool, float(capacity)
        self.raw = dict.fromkeys(tree.queues, 0.0)  # a leaf's demand, or the sum of its children's demands
        self.demand = dict.fromkeys(tree.queues, 0.0)  # raw capped at the queue's limit
        self._shares: dict[str, float] = {}
        self._dirty = True
        self.recomputed = 0  # how many times the water-filling ran (benchmarks read it)
        self.changed: set[str] = set()  # queues whose share the last water-filling changed
        # Parents whose split must run again (a child's demand changed), and the share each last split had:
        # a split is a pure function of those two, so the others keep their children's shares.
        self._stale: set[str] = set()
        self._split_share: dict[str, float] = {}
        # The tree as the water-filling reads it, per parent ("" for the top): children with their terms.
        self._kids: dict[str, list[Kid]] = {}
        for parent, children in [("", tree.top), *((q.name, q.children) for q in tree.queues.values())]:
            if children:
                self._kids[parent] = [(c.name, float(c.quota_of(pool)), c.weight_of(pool)) for c in children]

    def set_capacity(self, capacity: float) -> None:
        if capacity != self.capacity:
            self.capacity = float(capacity)
            self._dirty = True

    def add_demand(self, leaf: str, delta: float) -> None:
        # Fractions of GPUs (GPU sharing) are summed to a millionth, as the engine counts them: a queue whose
        # fractional jobs have all left must be back at exactly its demand before them.
        fractional = type(delta) is not int
        for q in self.tree[leaf].path:
            old = self.demand[q.name]
            raw = self.raw[q.name] + delta
            self.raw[q.name] = round(raw, 6) if fractional or not raw.is_integer() else raw
            new = min(self.raw[q.name], q.limit_of(self.pool))
            if new == old:
                return  # capped by its limit before and after: nothing above it changes
            self.demand[q.name] = new
            self._stale.add(q.parent.name if q.parent else "")
            if not self._dirty and self._moves(q, old, new):
                self._dirty = True
            delta = new - old

    def _moves(self, q: Queue, old: float, new: float) -> bool:
        quota = q.quota_of(self.pool)
        if min(quota, old) != min(quota, new):
            return True
        share = self._shares.get(q.name, 0.0)
        return not (share < old - EPS and share < new - EPS)

    @property
    def stale(self) -> bool:
        """A change may have moved the shares: the next shares() runs the water-filling."""
        return self._dirty

    def shares(self) -> dict[str, float]:
        """Current shares; the same dict object until something moved them."""
        if self._dirty:
            self._shares = self._water_fill()
            self._dirty = False
            self.recomputed += 1
        return self._shares

    def _water_fill(self) -> dict[str, float]:
        """Top down, re-running only the splits whose inputs (the parent's share, its children's demands)
        changed since they last ran; the result is the same as a full run, in a new dict."""
        old = self._shares
        shares = dict(old)
        stale, self._stale = self._stale, set()
        changed: set[str] = set()
        level = [("", self.capacity)]
        kids = self._kids
        while level:
            parent, share = level.pop()
            if parent in stale or self._split_share.get(parent) != share or parent not in self._split_share:
                self._split_share[parent] = share
                split(kids[parent], share, self.demand, shares)
                changed.update(name for name, _, _ in kids[parent] if old.get(name) != shares[name])
            level.extend((name, shares[name]) for name, _, _ in kids[parent] if name in kids)
        self.changed = changed if old else set(shares)
        return shares
