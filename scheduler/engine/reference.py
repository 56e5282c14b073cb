"""The reference engine: the admission pass as it stood before the event-driven pass, kept to check it against.

ReferenceEngine visits every leaf queue with pending jobs in key order at every pass, skipping the sleeping ones
one by one; Engine (engine.py) visits only the queues whose answer an event may have changed. Both must make
the same decisions: tests/test_engine_differential.py compares their event logs on random worlds, and
benchmarks/engine_scale.py --engine reference replays the benchmark worlds with it. Only the pass differs; the
bookkeeping (PoolState), admission and preemption are shared. Not for production use: it is slower by design.
"""

from __future__ import annotations

import heapq

from scheduler.engine.decisions import Decision
from scheduler.engine.engine import Engine
from scheduler.engine.guard import Reservation
from scheduler.engine.model import Job
from scheduler.engine.state import PoolState


class ReferenceEngine(Engine):
    """Engine with the pre-redesign pass: every queue with pending jobs is read at every pass."""

    def _pass(self, ps: PoolState, now: float, res: Reservation | None, out: list[Decision]) -> tuple[list[Job], bool]:
        """One pass: the leaf queue with the lowest ratio starts its first admissible job, until none can.

        Queues are read in key order, every leaf with pending jobs (frozen during the pass); a queue whose key changed
        (it started a job, or lost one to preemption) comes back through a small heap with its new key.
        """
        started: list[Job] = []
        preempted = False
        ps.freeze()
        ps.reserved_for(res)
        try:
            cursor = heapq.merge(ps.awake, ps.parked_order)  # every leaf with pending jobs, by key
            nxt = next(cursor, None)
            moved: dict[str, int] = {}  # queue -> version of its entry in `heap`; -1: skipped this pass
            heap: list[tuple[tuple[float, float, str], int, str]] = []
            short = ps.capacity_short
            asleep, grown = ps.asleep, ps.grown  # read for every queue: most of them sleep, with no room given back
            room_still_short, mixed, pool = ps.room_still_short, ps.mixed, ps.pool
            # The smallest pending request and the free GPUs off the reserved nodes, as of free room `counted_at`:
            # read for every queue at or over its share, and they change only when a job starts (Pool.changes).
            counted_at, need, free = -1, 0.0, 0.0
            while True:
                if counted_at != pool.changes:
                    counted_at, need, free = pool.changes, ps.min_need(), ps.usable_free(None)
                if not heap and free >= need:
                    # Most queues sleep, with no room given back since they last asked or with an answer for the
                    # free room as it is now that other sleepers who tried the same shapes found (room_still_short).
                    # While no queue can end the pass early (see below) and none waits in `heap`, they are
                    # skipped here, for less.
                    while nxt is not None:
                        if nxt[1] not in moved:
                            stuck = asleep.get(nxt[1])
                            if stuck is None:
                                break
                            if stuck.freed != grown:
                                if not ps.known_short(stuck, nxt[1]):
                                    break
                                stuck.freed = grown
                            moved[nxt[1]] = -1
                        nxt = next(cursor, None)
                while nxt is not None and nxt[1] in moved:
                    nxt = next(cursor, None)
                while heap and moved.get(heap[0][2]) != heap[0][1]:
                    heapq.heappop(heap)
                if heap and (nxt is None or heap[0][0] < nxt[0]):
                    key, _, name = heapq.heappop(heap)
                elif nxt is not None:
                    key, name = nxt
                    nxt = next(cursor, None)
                else:
                    break
                if (
                    key[0] >= 1
                    and not short
                    and name not in mixed
                    and (res is None or res.job.spec.queue in moved or res.job.spec.queue not in ps.pending)
                    and (pool.free_gpus + pool.loose if name == ps.reserved.queue else free) < need
                ):
                    # From here on every queue is at or over its fair share (so it has no tier 1 or 2) and no
                    # pending job fits in the free GPUs: only queues with lower-priority work (tier 3) remain.
                    rest = sorted(
                        n
                        for n, room in ps.mixed.items()
                        if n not in moved and room + ps.usable_free(n) >= ps.min_pending(n)
                    )
                    for name in rest:
                        found = self._try_queue(ps, self.tree[name], now, res)
                        if found is not None:
                            preempted |= self._apply(ps, found, now, out, started)
                    break
                stuck = asleep.get(name)
                if stuck is not None and (stuck.freed == grown or room_still_short(stuck, name)):
                    moved[name] = -1  # what _try_queue would find, for less
                    continue
                q = self.tree[name]
                found = self._try_queue(ps, q, now, res)
                if found is None:
                    moved[name] = -1
                    continue
                preempted |= self._apply(ps, found, now, out, started)
                if res is not None and found.job is res.job:
                    res = None
                    ps.reserved_for(res)
                grown = ps.grown
                for changed in {name} | {v.job.spec.queue for v in found.plan.victims}:
                    if moved.get(changed) == -1 or changed not in ps.pending:
                        continue
                    moved[changed] = moved.get(changed, 0) + 1
                    heapq.heappush(heap, (ps.queue_key(self.tree[changed]), moved[changed], changed))
        finally:
            ps.thaw()
        return started, preempted
