"""Per-pool bookkeeping: pending and running jobs per leaf queue, usage up the tree, fair shares, ratios.

Everything the admission pass reads is kept current here, by small updates on each change, so that one
pass costs what it admits rather than the number of queues and jobs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping

from sortedcontainers import SortedList

from quotas import PoolShares, QueueTree
from quotas.tree import Queue
from scheduler.engine.clearable import ClearIndex
from scheduler.engine.cluster import Pool
from scheduler.engine.guard import NOT_HELD, Held, Reservation
from scheduler.engine.memo import Need, Stuck, may_fit_any
from scheduler.engine.model import Amounts, Job, add_gpus, gpu_amount

QueueKey = tuple[float, float, str]
Entry = tuple[QueueKey, str]  # a leaf's place in key order: its key, its name


def victim_key(j: Job) -> tuple[int, float, int, str]:
    """Preemption order inside one queue: lowest priority, then most recent start (admitted later first)."""
    return (j.spec.priority, -j.start, -j.admitted, j.id)


def arrival_key(j: Job) -> tuple[float, int]:
    return (j.submit, j.seq)


def starve_key(j: Job) -> tuple[float, float, int]:
    return (j.skipped_since if j.skipped_since is not None else math.inf, j.submit, j.seq)


def ratio(usage: float, share: float) -> float:
    """usage / fair share; infinite where the share is 0."""
    return usage / share if share > 0 else math.inf


def quota_ratio(usage: float, quota: float) -> float:
    """usage / quota with 0/0 = 0 and x/0 = infinite: the tie-break between equal ratios."""
    if quota > 0:
        return usage / quota
    return 0.0 if usage == 0 else math.inf


class PoolState:
    """Everything the engine keeps for one pool; every mutation goes through the methods below."""

    def __init__(self, pool: Pool, tree: QueueTree, arrival_order: Callable[[Job], tuple[float, ...]] | None = None):
        self.pool = pool
        self.tree = tree
        self.name = pool.name
        self.pending: dict[str, SortedList] = {}  # leaf -> jobs in queue order
        self.running: dict[str, SortedList] = {}  # leaf -> jobs in victim order
        # any queue -> GPUs held in its subtree (ints while only whole GPUs are held: GPU sharing adds fractions)
        self.usage = Amounts()
        # any queue -> GPUs held in its subtree by non-preemptible jobs: what a non-preemptible job's guarantee
        # counts (SCHEDULING.md, Admission), since the queue's preemptible jobs can always be taken back.
        self.np_usage = Amounts()
        self.pending_sizes: dict[str, Counter[float]] = {}  # leaf -> request -> count
        self.pending_shapes: dict[str, Counter[tuple[object, ...]]] = {}  # leaf -> Job.shape -> count
        self.sizes: Counter[float] = Counter()  # request -> count, over the whole pool
        self.fs = PoolShares(tree, pool.name, pool.capacity)
        self._shares: dict[str, float] | None = None
        self.dirty = True  # something changed since the last scheduling pass
        # Leaf queues with pending jobs, by queue key, in two lists: those a pass visits (`awake`) and the parked
        # sleepers it does not (see `parked`); re-keyed after each change (deferred during a pass, as are moves
        # between the two).
        self.awake: SortedList = SortedList()
        self.parked_order: SortedList = SortedList()
        self._key: dict[str, QueueKey] = {}
        self._frozen = False
        self._deferred: set[str] = set()
        self._missed: set[str] = set()  # queues changed while shares were stale
        # Leaves whose first pending job outranks preemptible running jobs of theirs (tier 3 may apply), with
        # the GPUs those lower-priority jobs hold.
        self.mixed: dict[str, float] = {}
        # Queues over their quota, per parent ("" for the top level): tier 1 looks only at these.
        self.over_quota: dict[str, set[str]] = {}
        # Leaves over their fair share: tier 2 looks only at these.
        self.over_share: set[str] = set()
        self.version: Counter[str] = Counter()  # leaf -> bumps on every change to its jobs or usage
        # Counts starts that gave tiers 1 and 2 more to take (a queue over quota or share grew).
        self.victims_grew = 0
        # Starvation guard: queue heads not yet overtaken (by age), and overtaken ones (by when). An overtaken job
        # that is no longer its queue's head (a preempted job came back ahead of it) keeps its clock but leaves
        # `marked` until it is the head again, so that the longest-overtaken head is marked[0].
        self.unmarked: SortedList = SortedList(key=arrival_key)
        self.marked: SortedList = SortedList(key=starve_key)
        # All pending jobs of the pool in one order (submit order for fifo), kept only for policies with one
        # global queue. The key must not change while a job waits.
        self.arrivals: SortedList | None = SortedList(key=arrival_order) if arrival_order else None
        # Per node, the smallest fair-share slack of its jobs: which nodes preemption could ever empty.
        self._clear = ClearIndex()
        # Leaf -> what it depended on when it last found nothing to start (the engine's memo).
        self.stuck: dict[str, Stuck] = {}
        # Leaves stuck for want of free room alone, whose jobs have not changed since: a change to them, a share
        # that could give one of them the fair-share tier, or the reservation becoming or ceasing to be theirs,
        # wakes the queue (removes it here). Written only through sleep() and wake().
        self.asleep: dict[str, Stuck] = {}
        # Sleepers that only free GPUs could help (no shape counting their own jobs' GPUs, not in `mixed`, not the
        # reservation's queue), by the number of the shapes they tried (Stuck.shapes_id): a pass does not visit
        # them, it wakes a whole group at once when free room given back may fit its shapes (parked_fitting).
        self.parked: dict[str, int] = {}
        self.parked_by_shapes: dict[int, set[str]] = {}
        # Parked leaves woken while a pass ran: the pass visits those it has not passed yet (Engine._pass).
        self.woken: list[str] = []
        # The reservation the last pass ran under: its job's queue, the nodes it holds, whether it is within quota.
        self.reserved: Held = NOT_HELD
        # The reservation's job, what it waits on, and the queues it may hold jobs of.
        self._holder: tuple[Job, str | None, frozenset[str]] | None = None
        self.unreserved = 0  # bumps when the reservation may have let a job use a node it kept it from
        # may_fit_any's answers for the free room and reservation as they are now (Pool.changes, `reserved`), by
        # the shapes a sleeping queue tried that count only free GPUs (Stuck.plain, numbered in `shape_ids`) and
        # whether the reservation is its own: after a release, most sleepers tried the same few shapes. The numbers
        # are never reused, and there are few: one per distinct list of (request, GPUs per worker, workers, within
        # quota) that a queue found no room for.
        self.shape_ids: dict[tuple[Need, ...], int] = {}
        self._fits: dict[int, bool] = {}
        self._fits_at: tuple[int, Held] = (-1, self.reserved)
        # The free GPUs on the reserved nodes (usable_free), and the free room and nodes they were counted for.
        self._held_free = 0
        self._held_free_at: tuple[int, frozenset[str]] = (-1, frozenset())

    # ----- pending -----

    def add_pending(self, job: Job, moving: bool = False) -> None:
        """A job waits: newly submitted, or (moving) back from running, which leaves demand unchanged."""
        q = job.spec.queue
        jobs = self.pending.setdefault(q, SortedList(key=Job.order_key))
        old_head = jobs[0] if jobs else None
        jobs.add(job)
        self.pending_sizes.setdefault(q, Counter())[job.request] += 1
        self.pending_shapes.setdefault(q, Counter())[job.shape()] += 1
        self.sizes[job.request] += 1
        if job.spec.shared and job.spec.mig is None:
            self.pool.fractions[job.spec.gpus] += 1  # the pending mix the placement of fractions weighs
        if self.arrivals is not None:
            self.arrivals.add(job)
        if not moving:
            self.fs.add_demand(q, job.request)
        self._queue_changed(q, old_head)

    def remove_pending(self, job: Job, moving: bool = False) -> None:
        q = job.spec.queue
        jobs = self.pending[q]
        old_head = jobs[0]
        jobs.remove(job)
        if not jobs:
            del self.pending[q]
        sizes = self.pending_sizes[q]
        sizes[job.request] -= 1
        if not sizes[job.request]:
            del sizes[job.request]
        shapes, shape = self.pending_shapes[q], job.shape()
        shapes[shape] -= 1
        if not shapes[shape]:
            del shapes[shape]
        self.sizes[job.request] -= 1
        if not self.sizes[job.request]:
            del self.sizes[job.request]
        if job.spec.shared and job.spec.mig is None:
            self.pool.unpend_fraction(job.spec.gpus)
        if self.arrivals is not None:
            self.arrivals.remove(job)
        if not moving:
            self.fs.add_demand(q, -job.request)
        if job.skipped_since is not None:
            self.marked.discard(job)
            job.skipped_since = None
        self._queue_changed(q, old_head)

    def min_pending(self, leaf: str) -> float:
        return min(self.pending_sizes[leaf])

    def min_need(self) -> float:
        """The smallest request of any pending job in the pool."""
        return min(self.sizes) if self.sizes else 0

    # ----- running -----

    def add_running(self, job: Job) -> None:
        q = self.tree[job.spec.queue]
        self.running.setdefault(q.name, SortedList(key=victim_key)).add(job)
        self._clear.add(job)
        if not job.spec.preemptible:
            for a in q.path:
                self.np_usage[a.name] = add_gpus(self.np_usage[a.name], job.request)
        self._use(q, job.request)

    def add_restored(self, job: Job) -> None:
        """A job that was already running when the engine was built: running, and part of its queue's demand."""
        self.add_running(job)
        self.fs.add_demand(job.spec.queue, job.request)
        self.dirty = True

    def remove_running(self, job: Job, moving: bool = False) -> None:
        q = self.tree[job.spec.queue]
        jobs = self.running[q.name]
        jobs.remove(job)
        if not jobs:
            del self.running[q.name]
        self._clear.remove(job)
        if not job.spec.preemptible:
            for a in q.path:
                self.np_usage[a.name] = add_gpus(self.np_usage[a.name], -job.request)
        self._use(q, -job.request)
        if not moving:
            self.fs.add_demand(q.name, -job.request)

    def _use(self, q: Queue, delta: float) -> None:
        for a in q.path:
            u = self.usage[a.name] + delta
            self.usage[a.name] = u if type(u) is int else add_gpus(self.usage[a.name], delta)
            over = self.over_quota.setdefault(a.parent.name if a.parent else "", set())
            if self.usage[a.name] > a.quota_of(self.name):
                over.add(a.name)
                self.victims_grew += delta > 0
            else:
                over.discard(a.name)
        self._clear.queue_changed(q.name)
        self._mark_share(q)
        if delta > 0 and q.name in self.over_share:
            self.victims_grew += 1
        self._requeue(q.name)

    # ----- fair share and queue order -----

    @property
    def shares_version(self) -> int:
        """Bumps whenever the fair shares are recomputed."""
        self.shares()
        return self.fs.recomputed

    def shares(self) -> dict[str, float]:
        if self._shares is None or self.fs.stale:  # read millions of times a replay: the check is inlined
            self._refresh_shares()
        assert self._shares is not None
        return self._shares

    def _refresh_shares(self) -> None:
        shares = self.fs.shares()
        old = self._shares
        if shares is old:
            return
        self._shares = shares
        # Re-key only the queues whose share moved (all of them the first time).
        # Every water-filling is read here right after it runs, so what it changed is what moved since `old`.
        moved = (set(shares) if old is None else self.fs.changed) | self._missed
        self._missed = set()
        for name in moved:
            stuck = self.asleep.get(name)
            if stuck is not None and self.share_may_help(stuck, name, shares.get(name, 0.0)):
                self.wake(name)
            self._clear.queue_changed(name)
            if name in self.running:
                self._mark_share(self.tree[name])
            elif name in self.over_share:
                self.over_share.discard(name)
        for name in moved:
            self._rekey(name)

    def _mark_share(self, q: Queue) -> None:
        if self._shares is None or self.fs.stale:
            self._missed.add(q.name)  # the refresh catches up
            return
        self._clear.queue_changed(q.name)
        if self.usage[q.name] > self._shares.get(q.name, 0.0):
            self.over_share.add(q.name)
        else:
            self.over_share.discard(q.name)

    def clear_index(self) -> ClearIndex:
        """The per-node slacks, current with usage, shares and over-share marks."""
        shares = self.shares()
        self._clear.refresh(self.running, self.usage, shares, self.over_share)
        return self._clear

    def capacity_changed(self) -> None:
        self.fs.set_capacity(self.pool.capacity)
        self._refresh_shares()
        self.dirty = True

    def ratio(self, q: Queue, extra: float = 0) -> float:
        return ratio(self.usage[q.name] + extra, self.shares().get(q.name, 0.0))

    def queue_key(self, q: Queue) -> QueueKey:
        """Which leaf queue goes first: lowest ratio, then lowest usage/quota, then name."""
        u = self.usage[q.name]
        return (self.ratio(q), quota_ratio(u, q.quota_of(self.name)), q.name)

    def freeze(self) -> None:
        """A pass reads `awake` and the parked leaves in key order: re-keying and moves wait until it ends."""
        self._refresh_shares()
        self._frozen = True

    def thaw(self) -> None:
        self._frozen = False
        for name in self._deferred:
            self._rekey(name)
            self._place(name)  # where shares are stale, _rekey waits for the refresh: the move must not
        self._deferred.clear()
        self.woken.clear()

    def _queue_changed(self, name: str, old_head: Job | None) -> None:
        jobs = self.pending.get(name)
        head = jobs[0] if jobs else None
        if head is not old_head:
            if old_head is not None:
                (self.unmarked if old_head.skipped_since is None else self.marked).discard(old_head)
            if head is not None:
                (self.unmarked if head.skipped_since is None else self.marked).add(head)
        self._requeue(name)

    def _requeue(self, name: str) -> None:
        self.dirty = True
        self.version[name] += 1
        self.wake(name)
        jobs = self.pending.get(name)
        head = jobs[0] if jobs else None
        running = self.running.get(name)
        room: float = 0
        if head is not None and running:
            for j in running:  # victim order: lowest priority first
                if j.spec.priority >= head.spec.priority:
                    break
                if j.spec.preemptible:
                    room += j.request
        if type(room) is not int:
            room = gpu_amount(room)  # fractions summed once, to a millionth
        if room:
            self.mixed[name] = room
        else:
            self.mixed.pop(name, None)
        if self._frozen:
            self._deferred.add(name)
        else:
            self._rekey(name)

    def _rekey(self, name: str) -> None:
        if self.fs.stale or self._shares is None:
            self._missed.add(name)  # shares will change: the refresh re-keys it
            return
        old = self._key.pop(name, None)
        if old is not None:
            self._unfile(name, (old, name))
        if name in self.pending:
            key = self.queue_key(self.tree[name])
            self._key[name] = key
            self._file(name, (key, name))

    # ----- sleeping and parked queues -----

    def remember(self, name: str, stuck: Stuck) -> None:
        """What a leaf's "nothing to start" depended on (Engine._try_queue asks it before trying again)."""
        self.stuck[name] = stuck

    def sleep(self, name: str, stuck: Stuck) -> None:
        """A leaf found nothing to start for want of free room (see Engine._try_queue)."""
        self.asleep[name] = stuck
        self._place(name)

    def wake(self, name: str) -> None:
        """Something the leaf's answer read has changed: it is asked again."""
        if self.asleep.pop(name, None) is not None:
            if self._frozen and name in self.parked:
                self.woken.append(name)
            self._place(name)

    def _parkable(self, name: str) -> int | None:
        """The shapes id of a sleeper the pass need not visit until room is given back, or None."""
        stuck = self.asleep.get(name)
        if stuck is None or stuck.owned or not stuck.plain or name in self.mixed or name == self.reserved.queue:
            return None
        if stuck.shapes_id == -1:
            stuck.shapes_id = self.shape_ids.setdefault(stuck.plain, len(self.shape_ids))
        return stuck.shapes_id

    def _place(self, name: str) -> None:
        """Move a leaf between `awake` and the parked ones as its sleep says (after the pass, during one)."""
        if self._frozen:
            self._deferred.add(name)
            return
        key = self._key.get(name)
        if key is None or self.parked.get(name) == self._parkable(name):
            return  # not in the order yet (its rekey files it), or already where it belongs
        entry = (key, name)
        self._unfile(name, entry)
        self._file(name, entry)

    def _unfile(self, name: str, entry: Entry) -> None:
        shapes = self.parked.pop(name, None)
        if shapes is None:
            self.awake.remove(entry)
        else:
            self.parked_order.remove(entry)
            self.parked_by_shapes[shapes].discard(name)

    def _file(self, name: str, entry: Entry) -> None:
        shapes = self._parkable(name)
        if shapes is None:
            self.awake.add(entry)
        else:
            self.parked[name] = shapes
            self.parked_by_shapes.setdefault(shapes, set()).add(name)
            self.parked_order.add(entry)

    def parked_fitting(self, above: Entry | None) -> list[Entry]:
        """Parked leaves after `above` (in key order) that free room given back since they slept may now fit, with
        their keys: one fit answer per group of leaves that tried the same shapes (_may_fit_any)."""
        out: list[Entry] = []
        grown, asleep, key = self.grown, self.asleep, self._key
        for members in self.parked_by_shapes.values():
            first = True
            for name in members:
                stuck = asleep.get(name)
                if stuck is None or stuck.freed == grown or (above is not None and (key[name], name) <= above):
                    continue
                if first:
                    if not self._may_fit_any(stuck, name):
                        break
                    first = False
                out.append((key[name], name))
        return out

    def parked_between(self, low: Entry, high: Entry | None, visited: dict[str, int]) -> bool:
        """Is a parked leaf not visited in this pass, still asleep, between `low` and `high` (None: the end)?"""
        i = self.parked_order.bisect_right(low)
        order, asleep = self.parked_order, self.asleep
        while i < len(order):
            entry = order[i]
            if high is not None and entry >= high:
                return False
            if entry[1] not in visited and entry[1] in asleep:
                return True
            i += 1
        return False

    def entry(self, name: str) -> Entry:
        """A leaf's place in key order (as of the pass's start, during one)."""
        return (self._key[name], name)

    def visited_parked(self, name: str, high: Entry | None) -> bool:
        """Did the pass go past this parked leaf, as asleep, without visiting it (`high`: the highest it reached)?"""
        return high is not None and name in self.parked and (self._key[name], name) < high

    def share_may_help(self, stuck: Stuck, leaf: str, share: float) -> bool:
        """For a leaf stuck for want of room: could its new `share` give the fair-share tier to one of its jobs?
        Not while it stays below its usage plus its smallest request."""
        return stuck.share != share and add_gpus(self.usage[leaf], self.min_pending(leaf)) <= share

    @property
    def grown(self) -> int:
        """Bumps whenever room may have grown for a job: GPUs released, a node up, a node no longer reserved."""
        return self.pool.freed + self.unreserved

    def room_still_short(self, stuck: Stuck, queue: str) -> bool:
        """For a queue stuck for want of room (`stuck.needs`): has no room been given back since it was last
        asked, or none where one of the shapes it tried could fit? Notes that it was asked now."""
        grown = self.grown
        if stuck.freed != grown and self._may_fit_any(stuck, queue):
            return False
        stuck.freed = grown
        return True

    def _may_fit_any(self, stuck: Stuck, queue: str) -> bool:
        """memo.may_fit_any over the shapes a sleeping queue tried: those that count only free GPUs are asked once
        per change to free room for all the queues that tried the same ones."""
        if self.pool.free_gpus + self.pool.loose < stuck.least:
            return False
        if stuck.shapes_id == -1:
            stuck.shapes_id = self.shape_ids.setdefault(stuck.plain, len(self.shape_ids)) if stuck.plain else -2
        if stuck.shapes_id >= 0:
            fits = self._known_fits()
            key = self._fits_key(stuck, queue)
            fit = fits.get(key)
            if fit is None:
                fit = fits[key] = may_fit_any(self.pool, self.reserved, stuck.plain, queue)
            if fit:
                return True
        return bool(stuck.owned) and may_fit_any(self.pool, self.reserved, stuck.owned, queue)

    def known_short(self, stuck: Stuck, queue: str) -> bool:
        """Does an answer _may_fit_any kept already say that a sleeping queue has no room, without asking again?"""
        if stuck.shapes_id < 0 or stuck.owned:
            return False
        return self._known_fits().get(self._fits_key(stuck, queue)) is False

    def _fits_key(self, stuck: Stuck, queue: str) -> int:
        """Sleepers share an answer when they tried the same plain shapes and the reservation is, or is not, theirs."""
        return 2 * stuck.shapes_id + (queue == self.reserved.queue)

    def _known_fits(self) -> dict[int, bool]:
        """The answers _may_fit_any has kept for the free room and reservation as they are now (by _fits_key)."""
        if self._fits_at[0] != self.pool.changes or self._fits_at[1] is not self.reserved:
            self._fits.clear()
            self._fits_at = (self.pool.changes, self.reserved)
        return self._fits

    def usable_free(self, queue: str | None) -> float:
        """Free GPUs a job of `queue` over its quota may use: those on nodes held for another queue's job do not
        count (Reservation.excludes). None: a queue the reservation is not for. Plus Pool.loose: the room
        outside whole free GPUs (shared GPUs, MIG slices), an upper bound, as everything read from this is."""
        held_for, held, _ = self.reserved
        if held_for == queue or not held:
            return self.pool.free_gpus + self.pool.loose
        if self._held_free_at != (self.pool.changes, held):  # read for most queues of a pass: counted once
            nodes = self.pool.nodes
            self._held_free = sum(len(nodes[n].free) for n in held if nodes[n].up)
            self._held_free_at = (self.pool.changes, held)
        return self.pool.free_gpus - self._held_free + self.pool.loose

    def reserved_for(self, res: Reservation | None) -> None:
        """The reservation a pass runs under. A stuck queue's answer depends on it through which of the queue's
        jobs it holds back (the queues in `affected` wake when it changes; their memo keys on Reservation.key),
        and through the nodes kept from the queue's jobs (Reservation.excludes): more kept only takes room
        away, while a node let go, or nodes no longer kept from jobs within quota, give room back, like a
        release."""
        queue, nodes, within_quota = (
            (res.job.spec.queue, res.nodes, res.within_quota) if res else (None, frozenset(), False)
        )
        holder = (res.job, res.cause, res.affected) if res else None
        old_queue, old_nodes, old_within = self.reserved
        if holder != self._holder:
            for name in (self._holder[2] if self._holder else frozenset()) | (res.affected if res else frozenset()):
                self.wake(name)
            self._holder = holder
        if not nodes >= old_nodes or (old_within and not within_quota and old_nodes):
            self.unreserved += 1
        self.reserved = Held(queue, nodes, within_quota)
        if queue != old_queue:  # the reservation's queue is never parked
            for leaf in (queue, old_queue):
                if leaf is not None:
                    self._place(leaf)

    def guaranteed(self, q: Queue, job: Job) -> bool:
        """The guarantee rule: a non-preemptible job must fit its queue's quota counting only the GPUs the queue
        holds with non-preemptible jobs; a preemptible job is never held back by it."""
        return job.spec.preemptible or add_gpus(self.np_usage[q.name], job.request) <= q.quota_of(self.name)

    def over_limit(
        self, q: Queue, request: float, freed: Mapping[str, float] | None = None
    ) -> tuple[Queue, float] | None:
        """The first queue on q's path whose limit `request` more GPUs would break, with its usage."""
        usage, pool = self.usage, self.name
        for a in q.path:
            u = usage[a.name]
            if freed:
                u -= freed.get(a.name, 0)
                if type(u) is not int:
                    u = gpu_amount(u)
            after = u + request
            if type(after) is not int:  # fractions (GPU sharing): summed as add_gpus does; ints stay a plain add
                after = gpu_amount(after)
            if after > a.limit_of(pool):
                return a, u
        return None

    @property
    def capacity_short(self) -> bool:
        """Capacity below the top level's quotas: guarantees shrank, a queue may be under quota above its share."""
        return self.pool.capacity < sum(q.quota_of(self.name) for q in self.tree.top)

    # ----- starvation guard -----

    def mark_overtaken(self, youngest: tuple[float, int], now: float) -> list[Job]:
        """Heads older than `youngest` (a job that just started) start their starvation clock now; returns them."""
        marked: list[Job] = []
        while self.unmarked and arrival_key(self.unmarked[0]) < youngest:
            head = self.unmarked.pop(0)
            head.skipped_since = now
            self.marked.add(head)
            marked.append(head)
        return marked

    def longest_overtaken(self) -> Job | None:
        """The overtaken queue head that has waited longest since it was first overtaken."""
        return self.marked[0] if self.marked else None
