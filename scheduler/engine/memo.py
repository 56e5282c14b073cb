"""The memo of stuck queues: what a queue's "nothing to start" depended on, and when free room could help it again.

A queue that found nothing to start is not asked again until something its answer read has changed (see
Engine._try_queue). Where none of its jobs could preempt in other queues, only room given back matters, and
then only where one of the shapes it tried could fit: the tests here are necessary conditions for that fit,
cheap enough to run for every sleeping queue after every release.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from scheduler.engine.cluster import Pool
from scheduler.engine.guard import Held
from scheduler.engine.model import Job


class Need(NamedTuple):
    """One shape a room-only queue tried."""

    request: float  # GPUs
    gpus: float  # per worker
    workers: int
    within: bool  # within its queue's quota (the reservation keeps fewer nodes from it, see Reservation.excludes)
    own: tuple[tuple[str, int], ...]  # where only its queue's lower-priority work could make room: its GPUs per node
    shared: bool = False  # a fraction of a GPU or a MIG slice (JobSpec.shared): no whole-GPU worker slots to count


@dataclass(slots=True)
class Stuck:
    """A leaf queue that found nothing to start, and what that answer depended on."""

    own: tuple[object, ...]  # its jobs and usage (version), whether the reservation is its, its jobs' tiers lifted
    share: float  # its fair share then
    freed: int  # PoolState.grown then
    victims: tuple[object, ...] | None  # what else its preemption plans read; None: no job of it could preempt
    needs: list[Need] | None  # when none could preempt in other queues, the shapes it tried
    least: float = field(init=False)  # the fewest free GPUs any of those could start with
    # The needs that count only free GPUs (`plain`), which queues that tried the same ones share an answer for,
    # and those that count its own jobs' GPUs too (`owned`), asked for this queue alone.
    plain: tuple[Need, ...] = field(init=False)
    owned: tuple[Need, ...] = field(init=False)
    # `plain` numbered by its pool (PoolState.shape_ids): -1 not yet numbered, -2 none to number
    shapes_id: int = field(init=False, default=-1)

    def __post_init__(self) -> None:
        needs = self.needs or []
        self.least = min((n.request - sum(m for _, m in n.own) for n in needs), default=math.inf)
        self.plain = tuple(n for n in needs if not n.own)
        self.owned = tuple(n for n in needs if n.own)


def may_fit_any(pool: Pool, reserved: Held, needs: Iterable[Need], queue: str) -> bool:
    """Could any of these shapes that the room-only queue `queue` tried fit now, off the nodes the reservation
    (PoolState.reserved) keeps from it (Reservation.excludes)?"""
    held_for, held, held_within = reserved
    for request, gpus, workers, within, own, shared in needs:
        kept = held if held_for != queue and not (within and not held_within) else ()
        if may_fit(pool, request, gpus, workers, kept, own, shared):
            return True
    return False


def may_fit(
    pool: Pool,
    request: float,
    gpus: float,
    workers: int,
    kept: Collection[str] = (),
    own: Iterable[tuple[str, int]] = (),
    shared: bool = False,
) -> bool:
    """A necessary condition for placing a job on free GPUs, off the nodes `kept`, with those its queue's
    lower-priority work holds (`own`: node, GPUs) counted free: enough GPUs, and room for `workers` workers of
    `gpus` GPUs each. With `own`, this is Preemption.priority_only_hopeless's test itself. A shared job
    (a fraction, a MIG slice) counts the room outside whole free GPUs too (Pool.loose), and no worker slots."""
    added, gained, kept_slots = 0, 0, 0
    for name, more in own:
        n = pool.nodes[name]
        if n.up and name not in kept:
            added += more
            if gpus > 0 and not shared:
                gained += (len(n.free) + more) // int(gpus) - len(n.free) // int(gpus)
    if pool.free_gpus + pool.loose + added < request:
        return False
    if gpus <= 0 or shared:
        return True
    gpus = int(gpus)
    for name in kept:
        n = pool.nodes[name]
        kept_slots += len(n.free) // gpus if n.up else 0
    return pool.worker_slots(gpus) - kept_slots + gained >= workers


def own_room(running: Iterable[Job], job: Job) -> tuple[tuple[str, int], ...]:
    """GPUs per node held by the preemptible jobs of `running` (a queue's, in victim order) below `job`'s
    priority; a fractional job or MIG slice counts 1 (an upper bound: what it frees is at most one GPU's worth)."""
    more: Counter[str] = Counter()
    for j in running:
        if j.spec.priority >= job.spec.priority:
            break  # victim order: lowest priority first
        if j.spec.preemptible:
            for node, gpus in j.workers:
                more[node] += 1 if j.spec.shared else len(gpus)
    return tuple(more.items())
