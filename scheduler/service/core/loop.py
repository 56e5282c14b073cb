"""The service's heart: one lock around the engine, every decision written with its effects in one transaction."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from quotas import QueueTree
from sandbox.culling import IdlePolicy, IdleTracker
from scheduler.admission.rules import AdmissionPolicy
from scheduler.backends.base import CLUSTER_OWNER, Executor, Exit, NodeInfo
from scheduler.engine import Engine as Scheduler
from scheduler.engine.decisions import Decision, Preempted, Rejected, Started
from scheduler.engine.model import Settings
from scheduler.service.api.auth import Principal, TokenCache
from scheduler.service.api.errors import Conflict, Forbidden, Invalid, NotFound, ServiceError
from scheduler.service.core import cluster_sync, launching, outside, queues, rebuild, telemetry
from scheduler.service.core.cluster_state import ClusterState
from scheduler.service.core.culler import cull
from scheduler.service.core.hashing import HashPool
from scheduler.service.core.intake import Intake
from scheduler.service.core.interfaces import Stop
from scheduler.service.core.leader import Leadership
from scheduler.service.core.metrics import Metrics
from scheduler.service.core.rebuild import requeue_unlaunched, store_overtaken
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.core.specs import JobSubmit, engine_id, job_id_of
from scheduler.service.core.states import FINISHED, LIVE, AttemptOutcome, AttemptState, JobState
from scheduler.service.store import rows as store
from scheduler.service.store.db import attempts, jobs, nodes, queue_versions

log = logging.getLogger("corral.service")

BATCH_S = 0.005
DB_BACKOFF_MAX_S = 5.0  # the longest pause between cycles while the database is away


class Core:
    """Submissions, cancellations, queue changes and scheduling cycles, serialised by one lock.

    API reads go straight to the database; everything that changes state comes through here, so the engine
    (in memory) and the database always agree. The engine is rebuilt from the database at start and after a
    queue change: there is no second source of truth to drift.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        db: Engine,
        executor: Executor,
        nodes: list[NodeInfo],
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ):
        self.settings, self.db, self.executor, self.clock = settings, db, executor, clock
        self.cluster = ClusterState({n.name: n for n in nodes})
        self.leadership: Leadership | None = None  # several instances: only the leader's decisions commit
        self.started = False  # start() done: it recovered what ran and holds the engine
        self.metrics = metrics or Metrics()
        self.lock = threading.RLock()
        self.launch_lock = threading.Lock()  # one launch phase at a time (launching.launch_ready), before the lock
        self._team_sync = threading.Lock()
        self.wake = threading.Event()
        self.engine_settings = Settings(settings.min_runtime_s, settings.starvation_timeout_s)
        self.tree: QueueTree
        self.engine: Scheduler
        self.version = 0
        self.admissions = 0  # the last attempts.admission given (rebuild reads it back from the database)
        self.tokens = TokenCache()
        self.hashes = HashPool.from_settings(settings)  # model artifacts are hashed here (see hashing)
        self.policy: tuple[int, AdmissionPolicy] | None = None  # the admission policy in force (see admission.current)
        self._stale = False
        self._teams_stale = False  # the capacity changed since the last sync_teams
        self._unrecorded: list[Exit] = []
        self.in_flight: set[tuple[int, int]] = set()  # launches not recorded yet (launching.launch_ready)
        self.unrecorded_decisions: list[Decision] = []  # made by a rebuild; recorded by the next cycle
        self.intake = Intake(self)
        self.idle = IdleTracker(IdlePolicy(settings.idle_threshold_pct).for_profile(settings.idle_timeout_s))
        self._culled_at = -math.inf
        self._owed()
        self.tracer = telemetry.make_tracer(settings)  # a span per scheduling cycle (tick) and per API request

    @property
    def capacity(self) -> dict[str, int]:
        return self.cluster.capacity

    def pool_of(self, asked: str | None) -> str:
        """The pool a submission names, or the only pool there is."""
        if asked is not None:
            return asked
        pools = sorted(self.capacity)
        if len(pools) != 1:
            raise Invalid(f"name a pool: this installation has {', '.join(pools) or 'none'}", "pool")
        return pools[0]

    # ----- start-up -----

    def start(self) -> None:
        """Record this node, make sure a queue tree exists, then take back what ran before a restart."""
        now = self.clock()
        with self.lock, self.writing() as conn:
            conn.execute(nodes.delete())  # what the backend finds now is the truth about nodes
            for n in self.cluster.nodes.values():
                cluster_sync.write_node(conn, n, True)
            if queues.latest(conn) is None:
                doc = (queues.demo_document if self.settings.demo else queues.default_document)(self.capacity)
                conn.execute(
                    queue_versions.insert().values(
                        author="corral", created_at=now, document=doc, comment="initial tree"
                    )
                )
                store.add_audit(conn, now, "corral", "queues.apply", "version 1", comment="initial tree")
        with self.lock:
            self._recover(now)
            self._rebuild()
            self.started = True
        self.sync_teams()

    def _recover(self, now: float) -> None:
        """Match attempts the database says are live with what the executor finds (see rebuild.recover)."""
        rebuild.recover(self, now)

    def _rebuild(self) -> None:
        """A fresh engine from the database, deciding as the one it replaces (see rebuild.rebuild)."""
        built = rebuild.rebuild(self)
        self.tree, self.engine, self.version = built.tree, built.engine, built.version
        self.unrecorded_decisions = built.rejected
        self.admissions = built.admissions
        self._owed()

    def invalidate(self) -> None:
        """The engine may hold what the database does not: the next cycle rebuilds it."""
        self._stale = True

    def refresh(self) -> None:
        """Rebuild the engine from the database now: it matches again."""
        self._rebuild()
        self._stale = False

    def _owed(self) -> None:
        """Assume launches are owed and a max_runtime may be due: the next cycle looks in the database.
        Between such changes, an idle cycle does not: two queries a cycle held the lock for milliseconds
        under load, in front of every submission."""
        self.launch_owed = True  # an admitted attempt may wait for its launch (see launching.launch_ready)
        self.runtime_due = -math.inf  # no max_runtime runs out before this time (see _enforce_max_runtime)

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A transaction that records what the scheduler decided or did: with several instances, it commits only
        while this one leads (leader.Leadership.check, the fence), never after another took over."""
        with self.db.begin() as conn:
            if self.leadership is not None:
                self.leadership.check(conn)
            yield conn

    @contextmanager
    def changing(self) -> Iterator[Connection]:
        """A transaction for changes the engine has already made in memory: if it fails, the engine is rebuilt
        from the database, so a rolled-back decision is forgotten there too."""
        try:
            with self.writing() as conn:
                yield conn
        except ServiceError:
            raise  # refused before the engine changed
        except BaseException:
            try:
                self._rebuild()
            except sa.exc.SQLAlchemyError:
                self._stale = True  # the database is away: rebuild at the next cycle that can reach it
            raise

    # ----- submissions -----

    def submit(self, who: Principal, sub: JobSubmit) -> tuple[dict[str, Any], bool]:
        """Queue a job; (the job, True) when created, (the first job, False) for a repeated idempotency key."""
        return self.intake.submit(who, sub)

    def cancel(self, who: Principal, job_id: int, reason: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            with self.changing() as conn:
                job = self.readable(conn, who, job_id)
                if not who.may_cancel(self.tree, job["queue"], job["owner"]):
                    raise Forbidden(f"{who.user} ({who.role}) may not cancel job {job_id}")
                if job["state"] in FINISHED:
                    raise Conflict(f"job {job_id} already ended ({job['state']})")
                self.engine_end(job_id, now, None)
                stop = self._stop_attempt(conn, job, now, AttemptOutcome.CANCELLED)
                reason = reason or {"rule": "cancelled", "message": f"cancelled by {who.user}", "numbers": {}}
                store.update_job(conn, job_id, state=JobState.CANCELLED, ended_at=now, reason=reason)
                store.add_event(conn, now, "cancelled", reason["message"], job_id)
                store.add_audit(conn, now, who.user, "job.cancel", f"job {job_id}")
                row = store.job_row(conn, job_id)
            self.terminate(stop, now)
        self.wake.set()
        assert row is not None
        return store.job_view(row)

    def engine_end(self, job_id: int, now: float, failed: bool | None) -> None:
        """The engine frees the job's GPUs (cancelled when `failed` is None) and forgets it: from here on the
        database alone remembers the job (a failed commit rebuilds the engine from it)."""
        eid = engine_id(job_id)
        if failed is None:
            self.engine.cancel(eid, now)
        else:
            self.engine.finish(eid, now, failed=failed)
        self.engine.forget(eid)

    def readable(self, conn: Connection, who: Principal, job_id: int) -> RowMapping:
        """The job, if `who` may see it; another team's job is answered exactly like a missing one."""
        job = store.job_row(conn, job_id)
        if job is None or not who.may_read_job(self.tree, job["queue"], job["owner"]):
            raise NotFound(f"job {job_id} not found")
        return job

    # ----- queue changes -----

    def apply_queues(
        self,
        who: Principal,
        document: dict[str, Any],
        comment: str = "",
        dry_run: bool = False,
        expected_version: int | None = None,
    ) -> dict[str, Any]:
        """Validate the whole tree, check who may change what, then store it as a new version atomically.
        With `expected_version`, refuse (409) if another apply came first, so the diff shown is the one made."""
        with self.lock:
            new_tree = queues.build_tree(document, self.capacity)
            with self.db.connect() as conn:
                cur = queues.latest(conn)
                assert cur is not None
                live = conn.execute(
                    sa.select(jobs.c.queue, sa.func.count()).where(jobs.c.state.in_(LIVE)).group_by(jobs.c.queue)
                ).all()
            if expected_version is not None and cur["version"] != expected_version:
                raise Conflict(
                    f"the queue tree is at version {cur['version']}, not {expected_version}: "
                    "someone applied a change since; look at the diff again",
                    "expected_version",
                )
            if not who.may_change_queues():
                raise Forbidden(f"{who.user} ({who.role}) may not change queues")
            changes = queues.diff(cur["document"], document)
            for c in changes:
                # A changed queue must be the caller's before and after: no moving a queue out of one's subtree.
                trees = {"added": [new_tree], "removed": [self.tree]}.get(c["change"], [self.tree, new_tree])
                if not all(who.may_change_queue(t, c["queue"]) for t in trees):
                    raise Forbidden(f"{who.user} ({who.role}) may not change queue {c['queue']}", c["queue"])
            stranded = [(q, n) for q, n in live if q not in new_tree or not new_tree[q].is_leaf]
            if stranded:
                names = ", ".join(f"{q} ({n} live jobs)" for q, n in stranded)
                raise Invalid(
                    f"queues with pending or running jobs must stay leaf queues: {names}; cancel the "
                    "jobs or keep the queues",
                    "queues",
                )
            out: dict[str, Any] = {"version": cur["version"], "diff": changes, "applied": False}
            if dry_run or not changes:
                return out
            now = self.clock()
            with self.writing() as conn:
                out["version"] = conn.execute(
                    queue_versions.insert()
                    .values(author=who.user, created_at=now, document=document, comment=comment)
                    .returning(queue_versions.c.version)
                ).scalar_one()
                store.add_audit(
                    conn, now, who.user, "queues.apply", f"version {out['version']}", comment=comment, diff=changes
                )
            try:
                self._rebuild()
            except BaseException:
                self._stale = True  # the new version is committed: the next cycle must run on it
                raise
            out["applied"] = True
        self.sync_teams()
        self.wake.set()
        return out

    def sync_teams(self) -> None:
        """Let a backend with objects per team (Kubernetes: namespaces, RoleBindings, quotas, NetworkPolicies)
        follow the tree in force. Network calls: outside the lock and any transaction. One sync at a time, each
        on the tree in force when it starts, so the last one applies the newest tree. A failure is logged; the
        next apply or start tries again."""
        sync = getattr(self.executor, "sync_teams", None)
        if sync is None:
            return
        with self._team_sync:
            with self.lock:
                tree, capacity = self.tree, self.capacity
            try:
                sync(tree, capacity)
            except Exception:
                log.exception("could not bring the backend's team objects in line with queue tree %s", self.version)

    def rollback_queues(self, who: Principal, number: int) -> dict[str, Any]:
        with self.db.connect() as conn:
            old = queues.version(conn, number)
        if old is None:
            raise NotFound(f"queue tree version {number} not found")
        return self.apply_queues(who, old["document"], f"rollback to version {number}")

    # ----- the scheduling cycle -----

    @telemetry.traced_cycle
    def tick(self) -> list[Decision]:
        """One cycle: collect exits, enforce max_runtime, decide, write, then stop and launch processes."""
        started = time.perf_counter()
        cluster_sync.take_arrivals(self)  # outside the lock, like API submissions
        with self.lock:
            now = self.clock()
            if self._stale:  # a failed transaction left decisions in memory that the database never got
                self.refresh()
            capacity = self.capacity
            cluster_sync.sync_nodes(self, now)
            outside.sync_held(self, now)
            # Kept until a sync starts: a cycle that fails after the nodes changed still leaves it owed.
            self._teams_stale |= self.capacity != capacity
            # The executor reports each exit once: keep them until a commit has recorded them.
            self._unrecorded += self.executor.poll(now)
            exits = self._unrecorded
            later: list[Exit] = []  # exits of attempts whose launch is still being recorded: the next cycle's
            stops: list[Stop] = []
            with self.changing() as conn:
                for e in exits:
                    a = store.current_attempt(conn, int(e.job_id), e.attempt)
                    job = store.job_row(conn, int(e.job_id))
                    if a is None or job is None or a["state"] == AttemptState.ENDED:
                        continue
                    row: Mapping[Any, Any] = a
                    if a["state"] == AttemptState.STARTING and (int(e.job_id), e.attempt) in self.in_flight:
                        # Launched in the launch phase running now, not recorded yet: judged here, it would end
                        # (or go back to the queue), and the record that follows would hold it stopping forever.
                        later.append(e)
                        continue
                    if a["state"] == AttemptState.STARTING:  # launched, but the commit that said so was lost
                        if e.code is None:  # it never really ran: back to the queue, and the engine rebuilt
                            requeue_unlaunched(conn, job, a, now)
                            self._stale = True
                            continue
                        row = {**a, "state": AttemptState.RUNNING}
                    # The cluster moved it: it waits again, as if preempted.
                    if e.drained and row["state"] == AttemptState.RUNNING:
                        store.update_attempt(
                            conn,
                            job["id"],
                            a["attempt"],
                            state=AttemptState.ENDED,
                            ended_at=now,
                            exit_code=e.code,
                            outcome=AttemptOutcome.PREEMPTED,
                        )
                        stops += self.record(conn, self.engine.requeue(engine_id(job["id"]), e.detail), now)
                        continue
                    self.end_attempt(conn, job, row, e.code, e.detail, now)
                stops += self._enforce_max_runtime(conn, now)
                # Rejections the last rebuild made (jobs the tree in force can never run), then this cycle's.
                decisions = [*self.unrecorded_decisions, *self.engine.schedule(now)]
                self.unrecorded_decisions = []
                for d in decisions:
                    stops += self.record(conn, d, now)
                store_overtaken(conn, self.engine)
            self._unrecorded = later
            self.terminate(stops, now)
            if now - self._culled_at >= self.settings.cull_interval_s:  # under the lock: one culler at a time
                self._culled_at = now
                cull(self, self.idle, now)
        launching.launch_ready(self, now)  # its network calls outside the lock: submissions go on meanwhile
        self.metrics.cycle.observe(time.perf_counter() - started)
        if self._teams_stale:  # unlimited teams' quotas follow the capacity; outside the lock, like applies
            self._teams_stale = False
            self.sync_teams()
        return decisions

    def record(self, conn: Connection, d: Decision, now: float) -> list[Stop]:
        """Write an engine decision with its effects; the attempts to stop once it commits."""
        job_id = job_id_of(d.job)
        job = store.job_row(conn, job_id)
        assert job is not None
        reason = store.reason_json(d.reason)
        log.info(
            "job %s %s: %s",
            job_id,
            type(d).__name__.lower(),
            d.reason.message,
            extra={"job_id": job_id, "queue": job["queue"]},
        )
        if isinstance(d, Started):
            attempt = job["attempt"] + 1
            self.admissions += 1  # a failed commit rebuilds, which reads the last one stored back
            conn.execute(
                attempts.insert().values(
                    job_id=job_id,
                    attempt=attempt,
                    state=AttemptState.STARTING,
                    placement=[[n, list(g)] for n, g in d.workers],
                    gpus=job["gpus"],
                    admitted_at=now,
                    admission=self.admissions,
                )
            )
            first = job["started_at"] is None
            store.update_job(
                conn,
                job_id,
                state=JobState.STARTING,
                attempt=attempt,
                reason=reason,
                overtaken_at=None,
                started_at=now if first else job["started_at"],
            )
            store.add_event(conn, now, "admitted", d.reason.message, job_id, placement=d.placement, rule=d.reason.rule)
            self.launch_owed = True
            if first:
                self.metrics.wait.labels(queue=job["queue"]).observe(now - job["submitted_at"])
            return []
        if isinstance(d, Preempted):
            stop = self._stop_attempt(conn, job, now, AttemptOutcome.PREEMPTED)
            if job["owner"] == CLUSTER_OWNER or job["spec"].get("kind") == "sandbox":
                # A cluster job's pods are deleted; what their owner makes again is a new arrival, not this job
                # again. A sandbox (preempted only when its node goes) starts now or not at all: its hub has
                # already lost it, so it must not start later with nobody to connect.
                self.engine_end(job_id, now, None)
                store.update_job(conn, job_id, state=JobState.CANCELLED, ended_at=now, reason=reason)
            else:
                store.update_job(conn, job_id, state=JobState.PENDING, reason=reason)
            store.add_event(
                conn,
                now,
                "preempted",
                d.reason.message,
                job_id,
                cause=d.cause,
                by=job_id_of(d.by) if d.by else None,
                reason=reason,
            )
            self.metrics.preemptions.labels(cause=d.cause).inc()
            return stop
        assert isinstance(d, Rejected)
        store.update_job(conn, job_id, state=JobState.REJECTED, ended_at=now, reason=reason)
        store.add_event(conn, now, "rejected", d.reason.message, job_id)
        return []

    def _stop_attempt(self, conn: Connection, job: RowMapping, now: float, outcome: AttemptOutcome) -> list[Stop]:
        """Mark the job's live attempt as stopping (its process gets SIGTERM after the commit)."""
        a = store.current_attempt(conn, job["id"], job["attempt"])
        if a is None or a["state"] == AttemptState.ENDED:
            return []
        if a["state"] == AttemptState.STARTING:  # never launched: nothing to signal
            store.update_attempt(conn, job["id"], a["attempt"], state=AttemptState.ENDED, ended_at=now, outcome=outcome)
            return []
        if a["state"] == AttemptState.RUNNING:
            store.update_attempt(
                conn,
                job["id"],
                a["attempt"],
                state=AttemptState.STOPPING,
                outcome=outcome,
                stop_deadline=now + self.settings.grace_s,
            )
        return [(job["id"], a["attempt"], self.settings.grace_s)]

    def terminate(self, stops: Iterable[Stop], now: float) -> None:
        """Have the executor stop these attempts (after the commit that recorded why)."""
        for job_id, attempt, grace in stops:
            self.executor.terminate(str(job_id), attempt, grace, now)

    def end_attempt(
        self,
        conn: Connection,
        job: RowMapping,
        a: Mapping[Any, Any],
        code: int | None,
        detail: str,
        now: float,
        engine: bool = True,
    ) -> None:
        """An attempt's process is gone. If it was the job's running attempt, the job ended with it."""
        outcome = a["outcome"]
        if a["state"] == AttemptState.RUNNING:
            outcome = AttemptOutcome.COMPLETED if code == 0 else AttemptOutcome.FAILED
            if engine:
                self.engine_end(job["id"], now, outcome == AttemptOutcome.FAILED)
            why = detail or (f"exited with code {code}" if code is not None else "vanished")
            store.update_job(
                conn,
                job["id"],
                state=JobState(outcome),
                ended_at=now,
                exit_code=code,
                reason={"rule": outcome, "message": why, "numbers": {"exit_code": code}},
            )
        store.update_attempt(
            conn, job["id"], a["attempt"], state=AttemptState.ENDED, ended_at=now, exit_code=code, outcome=outcome
        )
        store.add_event(
            conn,
            now,
            "exited",
            detail or f"attempt {a['attempt']} exited with code {code}",
            job["id"],
            attempt=a["attempt"],
            exit_code=code,
            outcome=outcome,
        )

    def note_exit(self, ended: Exit) -> None:
        """An exit the executor will not report again (found at launch): the next cycle records it."""
        self._unrecorded.append(ended)

    def _enforce_max_runtime(self, conn: Connection, now: float) -> list[Stop]:
        if now < self.runtime_due:
            return []
        stops: list[Stop] = []
        due = math.inf
        q = (
            sa.select(jobs, attempts.c.started_at.label("attempt_started"))
            .join(attempts, sa.and_(attempts.c.job_id == jobs.c.id, attempts.c.attempt == jobs.c.attempt))
            .where(jobs.c.state == JobState.RUNNING, attempts.c.state == AttemptState.RUNNING)
        )
        for job in conn.execute(q).mappings():
            limit = job["spec"].get("max_runtime")
            if limit is None or job["attempt_started"] is None:
                continue
            if now - job["attempt_started"] < limit:
                due = min(due, job["attempt_started"] + limit)
                continue
            self.engine_end(job["id"], now, True)
            stops += self._stop_attempt(conn, job, now, AttemptOutcome.MAX_RUNTIME)
            msg = f"stopped after max_runtime of {limit:g} s"
            store.update_job(
                conn,
                job["id"],
                state=JobState.FAILED,
                ended_at=now,
                reason={"rule": "max_runtime", "message": msg, "numbers": {"max_runtime": limit}},
            )
            store.add_event(conn, now, "max_runtime", msg, job["id"])
        self.runtime_due = due  # a launch (running from then) brings it forward; a failed commit rebuilds
        return stops

    # ----- the loop -----

    def run(self, stop: threading.Event) -> None:
        """Cycle until `stop` is set: after each change (a submission wakes it) or every tick_s."""
        failing = 0
        while not stop.is_set():
            if self.wake.wait(self.settings.tick_s):
                # A few ms for the rest of a burst of submissions to land: one cycle decides them together.
                stop.wait(BATCH_S)
            self.wake.clear()
            try:
                self.tick()
                failing = 0
            except sa.exc.OperationalError as e:
                # The database is away: pause (longer each time, up to DB_BACKOFF_MAX_S) and try again; the
                # API answers 503 meanwhile. Nothing is lost: exits wait in memory, decisions are redone.
                failing = min(failing + 1, 6)
                log.warning("database unavailable, scheduling paused: %s", e.orig)
                stop.wait(min(DB_BACKOFF_MAX_S, self.settings.tick_s * 2**failing))
            except Exception:  # anything else must not stop scheduling for good; the next cycle retries
                log.exception("scheduling cycle failed")
