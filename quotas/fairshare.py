"""Weighted water-filling fair share, per pool, top-down through the queue tree (SCHEDULING.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from quotas.tree import Queue, QueueTree

EPS = 1e-9


def demands(tree: QueueTree, pool: str, leaf_demand: Mapping[str, int]) -> dict[str, float]:
    """Demand of every queue: a leaf's usage plus pending GPUs, an inner queue's children summed; capped at limit."""
    out: dict[str, float] = {}

    def walk(q: Queue) -> float:
        if q.is_leaf:
            d: float = leaf_demand.get(q.name, 0)
        else:
            d = sum(walk(c) for c in q.children)
        d = min(d, q.limit_of(pool))
        out[q.name] = d
        return d

    for q in tree.top:
        walk(q)
    return out


def split(children: Sequence[Queue], share: float, pool: str, demand: Mapping[str, float]) -> dict[str, float]:
    """Split a parent's `share` among its children: guarantees first, the rest by weight up to each cap."""
    given = {c.name: min(float(c.quota_of(pool)), demand[c.name]) for c in children}
    total = sum(given.values())
    if total > share + EPS:
        # Capacity was lost: every guarantee shrinks in proportion.
        scale = share / total if total > 0 else 0.0
        return {n: g * scale for n, g in given.items()}
    rest = share - total
    # Children still below their cap (limit and demand), in order of the level at which they fill up.
    open_ = [(c, min(c.limit_of(pool), demand[c.name]) - given[c.name]) for c in children]
    open_ = [(c, room) for c, room in open_ if room > EPS]
    weights = {c.name: c.weight_of(pool) for c, _ in open_}
    if open_ and sum(weights.values()) <= 0:
        # Only zero-weight children want more: they share what nobody with a weight wants, equally.
        weights = {n: 1.0 for n in weights}
    open_ = [(c, room) for c, room in open_ if weights[c.name] > 0]
    open_.sort(key=lambda cr: (cr[1] / weights[cr[0].name], cr[0].name))
    weight_left = sum(weights[c.name] for c, _ in open_)
    for c, room in open_:
        if rest <= EPS or weight_left <= 0:
            break
        w = weights[c.name]
        fill = rest * w / weight_left
        take = room if room <= fill + EPS else fill
        given[c.name] += take
        rest -= take
        weight_left -= w
    return given


def fair_shares(tree: QueueTree, pool: str, capacity: float, leaf_demand: Mapping[str, int]) -> dict[str, float]:
    """fairshare(Q, pool) for every queue, given the pool's up capacity and each leaf's demand (usage + pending)."""
    demand = demands(tree, pool, leaf_demand)
    shares: dict[str, float] = {}
    level: list[tuple[Sequence[Queue], float]] = [(tree.top, float(capacity))]
    while level:
        children, share = level.pop()
        part = split(children, share, pool, demand)
        shares.update(part)
        for c in children:
            if c.children:
                level.append((c.children, part[c.name]))
    return shares
