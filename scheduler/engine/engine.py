"""The engine: jobs in, decisions out. Admission by ratio, best-effort FIFO, preemption, starvation guard.

Pure: it never reads a clock (every call takes `now`), does no I/O and starts no threads, so the simulator,
the live service and the tests drive the very same code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from quotas import QueueTree
from quotas.tree import Queue
from scheduler.engine import snapshots
from scheduler.engine.cluster import Pool, workers_per_node
from scheduler.engine.decisions import GUARANTEE, HELD_NODES, LIMIT, Decision, Hold, Preempted, Rejected, Started
from scheduler.engine.explain import explain_pending, rejection
from scheduler.engine.guard import Reservation
from scheduler.engine.memo import Need, Stuck, may_fit, own_room
from scheduler.engine.model import Job, JobSpec, JobState, NodeSpec, Reason, Settings, add_gpus, gpu_amount
from scheduler.engine.ordering import PassOrder
from scheduler.engine.preemption import CAUSE, Plan, Preemption, Tier, tiers_for
from scheduler.engine.sharing import fgd_key
from scheduler.engine.state import PoolState
from scheduler.engine.timers import Wakeups

MAX_PASSES = 1000  # passes repeat only while skipped queues may have gained; this bounds a pathological loop


class Found(NamedTuple):
    """A job of the queue that can start now, and how (the victims to preempt first, the nodes it gets)."""

    job: Job
    plan: Plan


class Engine:
    """Scheduling state of a cluster; every method takes the current time and returns what it decided."""

    preemption = True  # baselines without preemption turn it off
    # The types the engine builds its per-pool state and preemption plans from: ShortcutFreeEngine
    # (shortcut_free.py) swaps in versions without the speed shortcuts, to check that they change no decision.
    pool_state: type[PoolState] = PoolState
    planner: type[Preemption] = Preemption
    # Baselines with one global queue keep all pending jobs in this order (see PoolState.arrivals).
    arrival_order: Callable[[Job], tuple[float, ...]] | None = None

    def __init__(
        self,
        tree: QueueTree,
        nodes: Iterable[NodeSpec],
        domains: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
        settings: Settings | None = None,
    ):
        self.tree = tree
        self.settings = settings or Settings()
        by_pool: dict[str, list[NodeSpec]] = {}
        for n in nodes:
            by_pool.setdefault(n.pool, []).append(n)
        domains = domains or {}
        self.pools: dict[str, PoolState] = {
            p: self.pool_state(
                Pool(p, ns, {d: list(m) for d, m in domains.get(p, {}).items()}, self.share_key),
                tree,
                self.arrival_order,
            )
            for p, ns in sorted(by_pool.items())
        }
        self.node_pool = {n.name: n.pool for ns in by_pool.values() for n in ns}
        self.jobs: dict[str, Job] = {}
        self._seq = 0
        self._admitted = 0
        self._wakeups = Wakeups(self.jobs)  # when to look again though no input came (timers.py)
        self._instant: float | None = None
        self._preempted_now: set[str] = set()  # jobs preempted at this instant: they may not preempt back
        # queue -> bumps when a new instant lifts the "preempted at this instant" restriction of one of its jobs
        self._lifted: Counter[str] = Counter()
        # Guard clocks started since the caller last asked (overtaken()): the service stores them for a rebuild.
        self._overtaken: dict[str, float] = {}
        # What the starvation guard held back, when the caller wants it (the simulator's report, property tests).
        self.holds: list[Hold] | None = None

    def share_key(self, room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
        """How a fractional job picks among shared GPUs with room (sharing.ShareKey; docs/scheduling.md, GPU
        sharing): fgd_key. A policy overrides it (baselines.BestFitFractions: plain best fit)."""
        return fgd_key(room, fraction, mix)

    # ----- inputs -----

    def submit(
        self, spec: JobSpec, now: float, *, seq: int | None = None, overtaken_at: float | None = None
    ) -> list[Decision]:
        """Queue a job submitted at `now`, or reject it at once when it can never run.

        A caller that rebuilds an engine (the service, after a restart) passes what the first engine knew: `seq`,
        the job's place in submission order (the last tie-break of queue order; give it for every job or for
        none), and `overtaken_at`, when its starvation-guard clock started (see overtaken())."""
        if spec.id in self.jobs:
            raise ValueError(f"job {spec.id!r} already exists")
        job = Job(spec, float(now), self._next_seq(seq))
        self.jobs[spec.id] = job
        why = rejection(spec, self.tree, {p: ps.pool for p, ps in self.pools.items()})
        if why is not None:
            job.state, job.reason = JobState.REJECTED, why
            return [Rejected(spec.id, why)]
        if overtaken_at is not None:
            job.skipped_since = float(overtaken_at)
            self._wakeups.guard(job, self.settings.starvation_timeout)
        self.pools[spec.pool].add_pending(job)
        return []

    def restore(
        self,
        spec: JobSpec,
        submit: float,
        start: float,
        workers: list[tuple[str, list[int]]],
        *,
        seq: int | None = None,
        reason: Reason | None = None,
    ) -> Job:
        """A job that is already running on these GPUs (the service rebuilding its engine after a restart or a
        quota change): it counts as running from `start`, and in its queue's demand, as if admitted in the order
        of restore calls (so call in the order the jobs were admitted). `seq` as for submit; `reason`, the one it
        started with, which explain() keeps answering."""
        if spec.id in self.jobs:
            raise ValueError(f"job {spec.id!r} already exists")
        ps = self.pools[spec.pool]
        ps.pool.take(spec, workers)
        self._admitted += 1
        q = self.tree[spec.queue]
        job = Job(
            spec,
            float(submit),
            self._next_seq(seq),
            JobState.RUNNING,
            float(start),
            self._admitted,
            [(n, list(g)) for n, g in workers],
        )
        job.within_quota = add_gpus(ps.usage[q.name], job.request) <= q.quota_of(ps.name)
        job.reason = reason or Reason(
            "restored", f"{spec.id} was running on {job.placement()} when the engine was rebuilt"
        )
        self.jobs[spec.id] = job
        ps.add_restored(job)
        self._wakeups.aging(job, self.settings.min_runtime)
        return job

    def _next_seq(self, seq: int | None) -> int:
        if seq is None:
            self._seq += 1
            return self._seq
        self._seq = max(self._seq, seq)
        return seq

    def cancel(self, job_id: str, now: float) -> bool:
        """Cancel a pending or running job (a running one frees its GPUs now). False if already finished."""
        return self._end(job_id, JobState.CANCELLED)

    def finish(self, job_id: str, now: float, failed: bool = False) -> bool:
        """A running job ended on its own (the executor reports it)."""
        return self._end(job_id, JobState.FAILED if failed else JobState.COMPLETED)

    def forget(self, job_id: str) -> None:
        """Drop a finished job, so that a long-running caller's memory does not grow with every job it ever ran
        (the service calls this once the job's end is recorded; the simulator keeps them for its report)."""
        job = self.jobs.get(job_id)
        if job is not None and job.state.finished:
            del self.jobs[job_id]
            self._preempted_now.discard(job_id)

    def _end(self, job_id: str, state: JobState) -> bool:
        job = self.jobs[job_id]
        if job.state.finished:
            return False
        ps = self.pools[job.spec.pool]
        if job.state is JobState.RUNNING:
            self._release(ps, job)
        else:
            ps.remove_pending(job)
        job.state = state
        return True

    def node_down(self, name: str, now: float) -> list[Decision]:
        """A node failed or was drained: its GPUs leave capacity and its jobs go back to pending."""
        ps = self.pools[self.node_pool[name]]
        out: list[Decision] = []
        hit = [j for jobs in ps.running.values() for j in jobs if any(n == name for n, _ in j.workers)]
        for j in sorted(hit, key=lambda j: j.admitted):
            self._stop(ps, j)
            out.append(
                Preempted(
                    j.id,
                    "node_down",
                    None,
                    Reason("node_down", f"node {name} went down while {j.id} ran on it", {"node": name}),
                )
            )
        ps.pool.set_up(name, False)
        ps.capacity_changed()
        return out

    def requeue(self, job_id: str, why: str) -> Preempted:
        """A running job whose attempt the cluster ended (its node drained): back to pending, keeping its place."""
        job = self.jobs[job_id]
        self._stop(self.pools[job.spec.pool], job)
        return Preempted(job.id, "node_drained", None, Reason("node_drained", why, {}))

    def node_up(self, name: str, now: float) -> None:
        ps = self.pools[self.node_pool[name]]
        ps.pool.set_up(name, True)
        ps.capacity_changed()

    def node_cordoned(self, name: str, now: float) -> None:
        """Nothing new lands on the node; what runs there stays (node_up lifts it; node_down still stops them)."""
        ps = self.pools[self.node_pool[name]]
        ps.pool.set_up(name, False)
        ps.capacity_changed()

    def node_held(self, name: str, gpus: int, cpus: float, memory_gb: float) -> None:
        """What pods Corral did not place hold on the node now (Kubernetes: DaemonSets, kube-scheduler's pods)."""
        ps = self.pools[self.node_pool[name]]
        ps.pool.hold(name, gpus, cpus, memory_gb)
        ps.dirty = True

    def node_room(self, name: str) -> tuple[int, float, float]:
        """The node's free GPUs, CPUs and memory (GiB; inf where not accounted), cordoned or not."""
        n = self.pools[self.node_pool[name]].pool.nodes[name]
        return len(n.free), n.free_cpus, n.free_mem

    # ----- queries -----

    def shares(self, pool: str) -> dict[str, float]:
        """fairshare(Q, pool) of every queue."""
        return self.pools[pool].shares()

    def pool_loads(self) -> dict[str, snapshots.PoolLoad]:
        """Every pool's usage, fair shares and backlog per queue, copied now."""
        return {name: snapshots.pool_load(ps) for name, ps in self.pools.items()}

    def pool_load(self, pool: str) -> snapshots.PoolLoad | None:
        """One pool's usage, fair shares and backlog per queue, copied now; None: no such pool."""
        ps = self.pools.get(pool)
        return None if ps is None else snapshots.pool_load(ps)

    def pool_gpus(self) -> dict[str, snapshots.PoolGpus]:
        """Every pool's nodes and the job holding each GPU, copied now."""
        return {name: snapshots.pool_gpus(ps) for name, ps in self.pools.items()}

    def job_state(self, job_id: str) -> JobState | None:
        """The state of a job the engine holds; None for one it does not hold (never given, or forgotten)."""
        job = self.jobs.get(job_id)
        return None if job is None else job.state

    def overtaken(self) -> dict[str, float]:
        """The starvation-guard clocks started since the last call (job id -> time a younger job first overtook
        it). A clock ends when its job starts or ends; what a rebuilt engine needs is in submit(overtaken_at=)."""
        out, self._overtaken = self._overtaken, {}
        return {i: t for i, t in out.items() if i in self.jobs and self.jobs[i].skipped_since == t}

    def next_wakeup(self, now: float) -> float | None:
        """The next instant after `now` where a rule's timer ends (min_runtime, starvation_timeout)."""
        return self._wakeups.next(now)

    def explain(self, job_id: str, now: float) -> Reason:
        """Why a job is where it is: the blocking rule with its numbers, or why it runs, or why it ended."""
        job = self.jobs[job_id]
        if job.state is JobState.PENDING:
            ps = self.pools[job.spec.pool]
            return explain_pending(ps, job, self._reservation(ps, now), job.id in self._preempted_now)
        if job.reason is not None:
            return job.reason
        return Reason(job.state.value, f"{job.id} is {job.state.value}")

    # ----- scheduling -----

    def schedule(self, now: float) -> list[Decision]:
        """Admit (and preempt) until nothing more can start; call after every batch of inputs."""
        if self._instant != now:
            for job_id in self._preempted_now:  # their tiers come back: their queues must look again
                job = self.jobs[job_id]
                q = job.spec.queue
                self._lifted[q] += 1
                for ps in self.pools.values():
                    ps.wake(q)
                if job.state is JobState.PENDING:  # even if nothing else changed in its pool since
                    self.pools[job.spec.pool].dirty = True
            self._instant, self._preempted_now = now, set()
        due = self._wakeups.due(now)
        self._wakeups.next(now)
        out: list[Decision] = []
        for ps in self.pools.values():
            if ps.pending and (ps.dirty or due):
                self._schedule_pool(ps, now, out)
            ps.dirty = False
        return out

    def _schedule_pool(self, ps: PoolState, now: float, out: list[Decision]) -> None:
        """Passes until one starts nothing, or until nothing a skipped queue could use has changed."""
        res = self._reservation(ps, now)
        for _ in range(MAX_PASSES):
            grew = ps.victims_grew
            started, preempted = self._pass(ps, now, res, out)
            if not started:
                return
            self._mark_skipped(ps, started, now)
            before, res = res, self._reservation(ps, now)
            # A queue skipped in this pass can do more only if GPUs were freed (preemption, a reservation
            # lifted or moved) or there is more to take back (a queue over quota or fair share grew).
            moved = (before.job if before else None) is not (res.job if res else None)
            # Its nodes moved too when a start left a reserved node with fewer free GPUs than another: the one it
            # let go may hold a job now (a fraction in what a shared GPU has left, or GPUs a whole job did not take).
            let_go = before is not None and res is not None and not res.nodes >= before.nodes
            if not (preempted or moved or let_go or ps.victims_grew != grew):
                return

    def _pass(self, ps: PoolState, now: float, res: Reservation | None, out: list[Decision]) -> tuple[list[Job], bool]:
        """One pass: the leaf queue with the lowest ratio starts its first admissible job, until none can.

        Queues come in key order from PassOrder (ordering.py), which reads only the awake ones and the parked
        ones an event woke, as if it had passed the other parked ones by (ReferenceEngine reads each of them).
        """
        started: list[Job] = []
        preempted = False
        ps.freeze()
        ps.reserved_for(res)
        try:
            order = PassOrder(ps)
            short, asleep, mixed, pool = ps.capacity_short, ps.asleep, ps.mixed, ps.pool
            # The smallest pending request and the free GPUs off the reserved nodes, as of free room `counted_at`:
            # read for every queue at or over its share, and they change only when a job starts (Pool.changes).
            counted_at, need, free = -1, 0.0, 0.0
            while True:
                if counted_at != pool.changes:
                    counted_at, need, free = pool.changes, ps.min_need(), ps.usable_free(None)
                entry = order.pop()
                # Once every queue is at or over its fair share (so it has no tier 1 or 2) and no pending job fits
                # in the free GPUs, only queues with lower-priority work (tier 3) remain: the pass ends with them,
                # at the first queue that shows it (a parked one passed by on the way to `entry` included).
                ends = (
                    free < need
                    and not short
                    and (res is None or order.read(res.job.spec.queue) or res.job.spec.queue not in ps.pending)
                )
                if ends and order.passes_parked(entry):
                    preempted |= self._tier3_rest(ps, now, res, out, started, order)
                    break
                if entry is None:
                    break
                order.reach(entry)
                key, name = entry
                if (
                    key[0] >= 1
                    and name not in mixed
                    and ends
                    and (pool.free_gpus + pool.loose if name == ps.reserved.queue else free) < need
                ):
                    preempted |= self._tier3_rest(ps, now, res, out, started, order)
                    break
                stuck = asleep.get(name)
                if stuck is not None and (stuck.freed == ps.grown or ps.room_still_short(stuck, name)):
                    order.skip(name)  # what _try_queue would find, for less
                    continue
                found = self._try_queue(ps, self.tree[name], now, res)
                if found is None:
                    order.skip(name)
                    continue
                preempted |= self._apply(ps, found, now, out, started)
                if res is not None and found.job is res.job:
                    res = None
                    ps.reserved_for(res)
                order.changed({name} | {v.job.spec.queue for v in found.plan.victims})
        finally:
            ps.thaw()
        return started, preempted

    def _tier3_rest(
        self,
        ps: PoolState,
        now: float,
        res: Reservation | None,
        out: list[Decision],
        started: list[Job],
        order: PassOrder,
    ) -> bool:
        """The pass's end once only tier 3 can start a job: the queues with lower-priority work, by name."""
        preempted = False
        rest = sorted(
            n for n, room in ps.mixed.items() if not order.read(n) and room + ps.usable_free(n) >= ps.min_pending(n)
        )
        for name in rest:
            found = self._try_queue(ps, self.tree[name], now, res)
            if found is not None:
                preempted |= self._apply(ps, found, now, out, started)
        return preempted

    def _apply(self, ps: PoolState, found: Found, now: float, out: list[Decision], started: list[Job]) -> bool:
        """Preempt the plan's victims, then start the job."""
        job, plan = found
        for v in plan.victims:
            self._stop(ps, v.job)
            self._preempted_now.add(v.job.id)
            assert v.reason is not None
            out.append(Preempted(v.job.id, CAUSE[v.tier], job.id, v.reason))
        out.append(self._start(ps, job, plan.nodes, now))
        started.append(job)
        return bool(plan.victims)

    def _try_queue(self, ps: PoolState, q: Queue, now: float, res: Reservation | None) -> Found | None:
        """The first job of `q`, in queue order, that can start now (best-effort FIFO)."""
        # A queue that found nothing stays stuck (see memo.py) until something could help it: a change to its
        # own jobs or share, the reservation becoming or ceasing to be its own, its preempted jobs' tiers back
        # at a new instant; and, where one of its jobs could preempt, room given back anywhere (PoolState.grown:
        # GPUs released, nodes the reservation let go), more to take back, new shares or (with min_runtime) a
        # new instant. Where none could, other queues' shares and victims do not matter: only room given back
        # where one of its jobs could then fit (PoolState.room_still_short), and its own share only through the
        # fair-share tier: a new share still below its usage plus its smallest request gives that tier to none
        # of its jobs. Such a queue sleeps (PoolState.asleep), so that _pass skips it for less.
        own = (ps.version[q.name], res.key(q.name) if res is not None else None, self._lifted[q.name])
        share = ps.shares().get(q.name, 0.0)
        stuck = ps.stuck.get(q.name)
        if stuck is not None and stuck.own == own:
            if stuck.needs is None:
                if stuck.share == share and stuck.freed == ps.grown and stuck.victims == self._victims_state(ps, now):
                    return None
            elif not ps.share_may_help(stuck, q.name, share) and ps.room_still_short(stuck, q.name):
                ps.sleep(q.name, stuck)
                return None
        if not self._may_start_any(ps, q):
            return None
        tried: set[tuple[object, ...]] = set()
        # Each shape tried, while none may take GPUs from other queues: what it needs free (see Stuck.needs).
        room_only: list[Need] | None = []
        # Once every shape of the queue has been tried (jobs preempted at this instant are asked differently, see
        # _admit), the jobs left can only repeat an answer: a long backlog is not walked to its end.
        shapes, plain = len(ps.pending_shapes[q.name]), 0
        again = (
            sum(
                1
                for j in map(self.jobs.__getitem__, self._preempted_now)
                if j.state is JobState.PENDING and j.spec.queue == q.name and j.spec.pool == ps.name
            )
            if self._preempted_now
            else 0
        )
        held = res if res is not None and q.name in res.affected else None
        for job in ps.pending[q.name]:
            if plain >= shapes and again <= 0:
                break
            now_preempted = job.id in self._preempted_now
            again -= now_preempted
            shape = (*job.shape(), now_preempted)
            if shape in tried:
                continue  # same ask, same answer
            tried.add(shape)
            plain += not now_preempted
            if held is not None:  # the starvation guard: what it holds depends on the job's shape alone
                cause = held.holds(job)
                if cause is not None:
                    if self.holds is not None:
                        self.holds.append(Hold(now, job.id, held.job.id, cause))
                    continue
            plan, only_own = self._admit(ps, job, q, now, res)
            if plan is not None:
                return Found(job, plan)
            if self.holds is not None and res is not None and res.nodes:
                self._note_held_nodes(ps, job, q, now, res)
            if room_only is not None:
                within = add_gpus(ps.usage[q.name], job.request) <= q.quota_of(ps.name)
                room_only = (
                    None
                    if only_own is None
                    else [
                        *room_only,
                        Need(
                            job.request,
                            job.spec.gpus,
                            job.spec.workers,
                            within,
                            own_room(ps.running.get(q.name, ()), job) if only_own else (),
                            job.spec.shared,
                        ),
                    ]
                )
        stuck = Stuck(own, share, ps.grown, None if room_only is not None else self._victims_state(ps, now), room_only)
        ps.remember(q.name, stuck)
        if room_only is None:
            ps.wake(q.name)
        else:
            ps.sleep(q.name, stuck)
        return None

    def _note_held_nodes(self, ps: PoolState, job: Job, q: Queue, now: float, res: Reservation) -> None:
        """Record a job that found no room only because of the nodes held for a starving job."""
        assert self.holds is not None
        within = add_gpus(ps.usage[q.name], job.request) <= q.quota_of(ps.name)
        if (
            res.excludes(job, within)
            and ps.over_limit(q, job.request) is None
            and ps.guaranteed(q, job)
            and ps.pool.place(job.spec, frozenset()) is not None
        ):
            self.holds.append(Hold(now, job.id, res.job.id, HELD_NODES))

    def _victims_state(self, ps: PoolState, now: float) -> tuple[object, ...]:
        """What else a preemption plan depends on: what there is to take back, the shares, and (with
        min_runtime) the time."""
        return ps.victims_grew, ps.shares_version, now if self.settings.min_runtime > 0 else None

    def _may_start_any(self, ps: PoolState, q: Queue) -> bool:
        """A cheap necessary condition, so that a full pool does not walk every pending job of every queue."""
        need = ps.min_pending(q.name)
        after = ps.usage[q.name] + need
        if type(after) is not int:
            after = gpu_amount(after)
        if after > q.limit_of(ps.name) and q.name not in ps.mixed:
            return False  # its own limit: only its own lower-priority jobs could make room (tier 3)
        if need <= ps.usable_free(q.name):
            return True
        running = ps.running.get(q.name)
        if running and ps.pending[q.name][0].spec.priority > running[0].spec.priority:
            return True  # tier 3: lower-priority work of its own
        u, pool = ps.usage[q.name], ps.name
        after = u + need
        if type(after) is not int:
            after = gpu_amount(after)
        return after <= q.quota_of(pool) or after <= ps.shares().get(q.name, 0.0)

    def _admit(
        self, ps: PoolState, job: Job, q: Queue, now: float, res: Reservation | None
    ) -> tuple[Plan | None, bool | None]:
        """A plan to start `job` now, or None; and, when no plan, what else could start it while its queue and
        its share stay as they are: None, preemption in other queues; True, free GPUs with those its queue's
        lower-priority work holds; False, free GPUs alone."""
        spec, pool = job.spec, ps.name
        after = ps.usage[q.name] + job.request
        within = (after if type(after) is int else gpu_amount(after)) <= q.quota_of(pool)
        excluded = res.excludes(job, within) if res is not None else frozenset()
        allowed = ps.over_limit(q, job.request) is None and ps.guaranteed(q, job)
        if allowed:
            nodes = (
                ps.pool.place(spec, excluded)
                if may_fit(ps.pool, job.request, spec.gpus, spec.workers, excluded, (), spec.shared)
                else None
            )
            if nodes is not None:
                return Plan([], nodes), False
        if not self.preemption:
            return None, False
        tiers = tiers_for(ps, job, q)
        if job.id in self._preempted_now:
            # Preempted at this instant: it may not take GPUs back across queues now (that could go back
            # and forth forever), only from lower-priority jobs of its own queue.
            tiers &= {Tier.PRIORITY}
        if not tiers:
            return None, False
        preemption = self.planner(
            ps, job, q, excluded, lambda j: self._young(j, now), tiers, quiet=self.settings.min_runtime <= 0
        )
        if tiers == {Tier.PRIORITY} and preemption.priority_only_hopeless():
            return None, True
        return preemption.plan(), None

    def _young(self, j: Job, now: float) -> bool:
        """Under min_runtime: not a victim yet (its aging timer, set when it started, wakes the engine then)."""
        return now < j.start + self.settings.min_runtime

    # ----- state changes -----

    def _start(self, ps: PoolState, job: Job, nodes: list[str], now: float) -> Started:
        q = self.tree[job.spec.queue]
        u, share, quota = ps.usage[q.name], ps.shares().get(q.name, 0.0), q.quota_of(ps.name)
        ps.remove_pending(job, moving=True)
        job.workers = ps.pool.allocate(job.spec, nodes)
        job.state, job.start, job.skipped_since = JobState.RUNNING, now, None
        self._admitted += 1
        job.admitted = self._admitted
        job.within_quota = add_gpus(u, job.request) <= quota
        self._wakeups.aging(job, self.settings.min_runtime)
        np = ps.np_usage[q.name]
        ps.add_running(job)
        nums: dict[str, float | int | str] = {"usage": u, "request": job.request, "quota": quota, "fair_share": share}
        if not job.spec.preemptible:
            # Guaranteed by its queue's non-preemptible GPUs alone: over quota in all, its queue's preemptible jobs
            # are the ones that borrow (and that other queues take back).
            job.reason = Reason(
                "within_quota",
                (
                    f"started within its guarantee (non-preemptible): {q.name} holds {np} + {job.request} "
                    f"non-preemptible GPUs of {ps.name}, quota {quota}; {u} GPUs in all, fair share {share:.2f}"
                ),
                {**nums, "np_usage": np},
            )
        else:
            how = "within its quota" if job.within_quota else "borrowing idle GPUs (preemptible)"
            job.reason = Reason(
                "within_quota" if job.within_quota else "borrowing",
                (
                    f"started {how}: {q.name} uses {u} + {job.request} GPUs of {ps.name}, quota {quota}, "
                    f"fair share {share:.2f}"
                ),
                nums,
            )
        return Started(job.id, job.placement(), job.reason, tuple((n, tuple(g)) for n, g in job.workers))

    def _release(self, ps: PoolState, job: Job, moving: bool = False) -> None:
        ps.remove_running(job, moving)
        ps.pool.release(job.spec, job.workers)
        job.workers = []

    def _stop(self, ps: PoolState, job: Job) -> None:
        """A running job goes back to pending, keeping its submit time (and its place in queue order)."""
        self._release(ps, job, moving=True)
        job.state, job.skipped_since = JobState.PENDING, None
        ps.add_pending(job, moving=True)

    # ----- starvation guard -----

    def _mark_skipped(self, ps: PoolState, started: list[Job], now: float) -> None:
        """Heads of queues that a younger job just overtook start their starvation clock."""
        marked = ps.mark_overtaken(max((j.submit, j.seq) for j in started), now)
        for j in marked:
            self._wakeups.guard(j, self.settings.starvation_timeout)
            self._overtaken[j.id] = now

    def _reservation(self, ps: PoolState, now: float) -> Reservation | None:
        """Reserve for the head job overtaken longest ago, once that is past starvation_timeout."""
        h = ps.longest_overtaken()
        if h is None or h.skipped_since is None or now - h.skipped_since < self.settings.starvation_timeout:
            return None
        q = self.tree[h.spec.queue]
        within = add_gpus(ps.usage[q.name], h.request) <= q.quota_of(ps.name)
        # Blocked on a limit or on its guarantee (and perhaps on room too, later), free room is not what it lacks:
        # holding nodes would idle GPUs for nothing. The limit is asked first, as admission does.
        blocked = ps.over_limit(q, h.request)
        if blocked is not None:
            return Reservation(h, frozenset(), within, LIMIT, frozenset(self.tree.leaves_under(blocked[0].name)))
        if not ps.guaranteed(q, h):
            return Reservation(h, frozenset(), within, GUARANTEE, frozenset({q.name}))
        return Reservation(h, self._reserve_nodes(ps, h), within, None, frozenset({q.name}))

    @staticmethod
    def _reserve_nodes(ps: PoolState, h: Job) -> frozenset[str]:
        """The nodes closest to holding the job (most free GPUs first): nothing else lands on them."""
        chosen: list[str] = []
        left = h.spec.workers
        for bucket in reversed(ps.pool.buckets):  # up nodes by free GPUs, most first, then by name
            for name in bucket:
                if left <= 0:
                    return frozenset(chosen)
                spec = ps.pool.nodes[name].spec
                take = workers_per_node(h.spec, spec.gpus, spec.cpus, spec.memory_gb, spec.mig)
                if take > 0:
                    chosen.append(name)
                    left -= take
        return frozenset(chosen)
