"""Launching admitted attempts once their GPUs are free, several at once where the executor allows it.

Called after the cycle's commit, without the Core's lock: what to launch is read under it, the executor's launch()
calls run outside it (in worker threads where the executor allows it, LaunchesInParallel), and each outcome is
recorded under it as it comes, one short transaction each, none of them around a network call. Submissions,
cancels and reads go on while the cluster answers; an attempt that ended meanwhile is stopped once launched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from scheduler.backends.base import Executor, Exit, Handle, Launch, LaunchesInParallel
from scheduler.backends.sharing import EPSILON as SHARE_EPSILON
from scheduler.service.core.interfaces import Launches
from scheduler.service.core.specs import JobSubmit
from scheduler.service.core.states import HOLDING, AttemptOutcome, AttemptState, JobState
from scheduler.service.store import rows as store
from scheduler.service.store.db import attempts, jobs

log = logging.getLogger("corral.service")

Launched = tuple[Handle, Exit | None]  # the attempt's handle, and how it ended if it was found ended already


def launch_ready(core: Launches, now: float) -> None:
    """Launch admitted attempts whose GPUs no live process holds (a preempted job may still be exiting); while some
    admitted attempt is still not launched (waiting for GPUs, or to be tried again), core.launch_owed stays True.

    Called without the Core's lock. The launches' network calls run outside it, so submissions, cancels and reads
    go on meanwhile (the scheduling loop held it through them, and every submission waited: under a stream of
    submissions that wait was most of their time, Kubernetes benchmark). One launch phase at a time (launch_lock,
    always taken before the Core's lock); what to launch is read, and each outcome recorded, under the Core's lock.
    An attempt ended meanwhile (its job cancelled or preempted) is stopped again once launched (_record)."""
    with core.launch_lock:
        with core.lock:
            if not core.launch_owed:
                return
            todo, waiting = _prepare(core, now)
            core.launch_owed = False  # a rebuild meanwhile (a queue apply) owes launches again: it sets it back
            keys = {(int(launch.job_id), a["attempt"]) for a, launch in todo}
            core.in_flight |= keys
        try:
            waiting |= _launch_all(core, todo, now)
        except BaseException:
            core.launch_owed = True
            raise
        finally:
            with core.lock:
                core.in_flight -= keys
        if waiting:
            core.launch_owed = True


def _prepare(core: Launches, now: float) -> tuple[list[tuple[Mapping[Any, Any], Launch]], bool]:
    """Under the Core's lock: the attempts to launch now, and whether others wait."""
    todo: list[tuple[Mapping[Any, Any], Launch]] = []
    ready, waiting = _ready(core)
    # A max_runtime counts from the launch: the scan for it (Core._enforce_max_runtime) is due by then. Set before any
    # launch is recorded, since one whose commit reported failure may still have landed. Jobs without one change
    # nothing (when every launch forced the scan of all running jobs, it took 16-18% of the service's CPU in the
    # Kubernetes benchmark).
    core.runtime_due = min(
        core.runtime_due,
        min(
            (now + job["spec"]["max_runtime"] for _, job in ready if job["spec"].get("max_runtime") is not None),
            default=math.inf,
        ),
    )
    for a, job in ready:
        try:
            todo.append((a, _launch_of(job, a)))
        except ValueError as e:  # a spec that no longer validates: this job cannot start
            _failed(core, job["id"], a["attempt"], e, now)
    return todo, waiting


def _launch_all(core: Launches, todo: list[tuple[Mapping[Any, Any], Launch]], now: float) -> bool:
    """Launch (without the Core's lock), recording each outcome under it as it comes; True if some is to be tried
    again."""
    width = core.executor.launch_parallelism if isinstance(core.executor, LaunchesInParallel) else 1
    waiting = False
    if width <= 1 or len(todo) <= 1:
        for a, launch in todo:
            outcome = _start(core.executor, launch)
            with core.lock:
                waiting |= _record(core, a, launch, outcome, now)
        return waiting
    errors: list[Exception] = []
    with ThreadPoolExecutor(min(width, len(todo)), thread_name_prefix="corral-launch") as pool:
        started = {pool.submit(_start, core.executor, launch): (a, launch) for a, launch in todo}
        for f in as_completed(started):  # recorded as each returns: a slow launch holds up no other
            a, launch = started[f]
            try:  # every outcome is recorded, whatever happens to one of them (a database error)
                with core.lock:
                    waiting |= _record(core, a, launch, f.result(), now)
            except Exception as e:
                errors.append(e)
    if errors:
        raise errors[0]
    return waiting


def _ready(core: Launches) -> tuple[list[tuple[Mapping[Any, Any], Mapping[Any, Any]]], bool]:
    """Admitted attempts (oldest first) with their jobs, whose GPUs live attempts leave room on, and whether other
    admitted attempts wait.

    Only what can still hold a GPU the engine gave again is read: stopping attempts (the engine freed their GPUs
    when it preempted, cancelled or timed them out; their processes may still be exiting) and the live attempts of
    the jobs being launched. A running attempt of another job holds GPUs the engine still counts as its own (every
    change that frees them marks the attempt stopping or ended in the same transaction, and a rebuild restores
    it where it runs), so the engine never gives them again: a share it places on a GPU fits beside the running
    shares there. Reading every running attempt each launching cycle cost a third of the service's CPU in the
    Kubernetes benchmark (run 4), growing with the jobs running. A stopping attempt blocks its GPUs whole (and a
    MIG slice of its profile on its node) until it is gone: what it held is not known to be free yet."""
    with core.db.connect() as conn:
        starting = list(
            conn.execute(
                sa.select(attempts).where(attempts.c.state == AttemptState.STARTING).order_by(attempts.c.admitted_at)
            ).mappings()
        )
        if not starting:
            return [], False
        launching = {a["job_id"] for a in starting}
        holding = list(
            conn.execute(
                sa.select(attempts.c.job_id, attempts.c.placement).where(
                    sa.or_(
                        attempts.c.state == AttemptState.STOPPING,
                        sa.and_(attempts.c.state.in_(HOLDING), attempts.c.job_id.in_(launching)),
                    )
                )
            ).mappings()
        )
        wanted = launching | {a["job_id"] for a in holding}
        specs = {j["id"]: j for j in conn.execute(sa.select(jobs).where(jobs.c.id.in_(wanted))).mappings()}
    held = _Held()
    for a in holding:
        held.block(a, specs[a["job_id"]]["spec"])
    busy_jobs = {a["job_id"] for a in holding}
    ready = []
    for a in starting:
        spec = specs[a["job_id"]]["spec"]
        if a["job_id"] not in busy_jobs and held.room(a, spec):
            ready.append(a)
            held.add(a, spec)  # launched together, so they must fit together
    return [(a, specs[a["job_id"]]) for a in ready], len(starting) > len(ready)


class _Held:
    """What stopping and about-to-launch attempts hold: shares per GPU (a whole GPU is 1), MIG slices blocked per
    node and profile."""

    def __init__(self) -> None:
        self.shares: dict[tuple[str, int], float] = {}
        self.blocked: set[tuple[str, str]] = set()  # (node, MIG profile) a stopping attempt still holds a slice of

    @staticmethod
    def _share(spec: Mapping[str, Any]) -> float:
        gpus = spec.get("gpus", 1)
        return float(gpus) if isinstance(gpus, float) and 0 < gpus < 1 else 1.0

    def room(self, a: Mapping[Any, Any], spec: Mapping[str, Any]) -> bool:
        profile, share = spec.get("mig"), self._share(spec)
        for n, gs in a["placement"]:
            if profile is not None and (n, profile) in self.blocked:
                return False
            if any(self.shares.get((n, g), 0.0) + share > 1 + SHARE_EPSILON for g in gs):
                return False
        return True

    def add(self, a: Mapping[Any, Any], spec: Mapping[str, Any], share: float | None = None) -> None:
        share = self._share(spec) if share is None else share
        for n, gs in a["placement"]:
            for g in gs:
                self.shares[(n, g)] = self.shares.get((n, g), 0.0) + share

    def block(self, a: Mapping[Any, Any], spec: Mapping[str, Any]) -> None:
        """A stopping attempt (or a live one of a job being launched): its GPUs count whole, its MIG slice blocks
        its profile on its node."""
        self.add(a, spec, 1.0)
        if spec.get("mig") is not None:
            self.blocked.update((n, spec["mig"]) for n, _ in a["placement"])


def _launch_of(job: Mapping[Any, Any], a: Mapping[Any, Any]) -> Launch:
    gpus: dict[str, list[int]] = {}
    for n, gs in a["placement"]:
        gpus.setdefault(n, []).extend(gs)
    sub = JobSubmit.model_validate(job["spec"])
    # Launch.gpus merges workers that share a node: the gang's shape travels in the environment.
    env = {
        **sub.env,
        "CORRAL_QUEUE": job["queue"],
        "CORRAL_POOL": job["pool"],
        "CORRAL_OWNER": job["owner"],
        "CORRAL_WORKERS": str(sub.workers),
        "CORRAL_GPUS_PER_WORKER": str(sub.gpus),
        "CORRAL_KIND": sub.kind,
    }
    shared = sub.mig is None and isinstance(sub.gpus, float) and 0 < sub.gpus < 1
    return Launch(
        str(job["id"]),
        a["attempt"],
        sub.command,
        gpus,
        env,
        sub.workdir,
        sub.image,
        cpus=sub.cpus or None,
        memory_gb=sub.memory_gb or None,
        owner=job["owner"],
        gpu_fraction=float(sub.gpus) if shared else None,
        mig=sub.mig,
    )


@dataclass(frozen=True)
class Unsure:
    """A launch that failed in a way that says nothing of what it did (a dropped connection): the attempt stays
    admitted and the next cycle launches it again, which executors take (a 409, FileExistsError, known)."""

    error: Exception


def _start(executor: Executor, launch: Launch) -> Launched | Exception | Unsure:
    """Launch (in a worker thread, maybe); an OSError or ValueError is returned: the job cannot start."""
    try:
        return executor.launch(launch), None
    except FileExistsError:
        # Launched before, but the commit that said so was lost (the database went away): take it back.
        handle = Handle(launch.job_id, launch.attempt, None, 0.0)
        return handle, executor.adopt(handle)
    except (OSError, ValueError) as e:
        return e
    except Exception as e:  # failing the job here could free GPUs its processes or pods still hold
        log.warning("launch of job %s attempt %d: %s; trying again next cycle", launch.job_id, launch.attempt, e)
        return Unsure(e)


def _record(
    core: Launches, a: Mapping[Any, Any], launch: Launch, outcome: Launched | Exception | Unsure, now: float
) -> bool:
    """Write how a launch went, under the Core's lock; True when the attempt is still to launch (tried again next
    cycle). The attempt may have ended while it launched (its job cancelled, or preempted by another cycle): what
    was launched for it is then stopped as a running attempt is, and holds its GPUs until it is gone."""
    job_id = int(launch.job_id)
    core.in_flight.discard((job_id, a["attempt"]))  # an exit reported from now on finds what this writes
    if isinstance(outcome, (Unsure, Exception)):
        with core.db.connect() as conn:
            row = store.current_attempt(conn, job_id, a["attempt"])
        wanted = row is not None and row["state"] == AttemptState.STARTING
        if isinstance(outcome, Unsure):
            if not wanted:  # it may have landed: no process of an ended attempt may stay
                core.executor.terminate(launch.job_id, a["attempt"], 0.0, now)
            return wanted
        if wanted:  # this job cannot start (no such workdir, ...): it fails alone
            _failed(core, job_id, a["attempt"], outcome, now)
        return False
    handle, ended = outcome
    if ended is not None:
        core.note_exit(ended)
    ran = dict(pid=handle.pid, proc_started=handle.started_at, started_at=now)
    with core.writing() as conn:
        this = sa.and_(attempts.c.job_id == job_id, attempts.c.attempt == a["attempt"])
        started = conn.execute(
            attempts.update()
            .where(this, attempts.c.state == AttemptState.STARTING)
            .values(state=AttemptState.RUNNING, **ran)
        )
        if started.rowcount == 0:  # ended meanwhile: the engine freed its GPUs; held here until it is gone
            grace = core.settings.grace_s
            conn.execute(
                attempts.update()
                .where(this)
                .values(state=AttemptState.STOPPING, ended_at=None, stop_deadline=now + grace, **ran)
            )
            store.add_event(conn, now, "stopping", f"attempt {a['attempt']} ended while it launched", job_id)
        else:
            store.update_job(conn, job_id, state=JobState.RUNNING)
            store.add_event(
                conn,
                now,
                "started",
                f"process {handle.pid} on {gpus_text(launch.gpus)}",
                job_id,
                pid=handle.pid,
                gpus=dict(launch.gpus),
                attempt=a["attempt"],
            )
    if started.rowcount == 0:
        core.executor.terminate(launch.job_id, a["attempt"], grace, now)
    return False


def gpus_text(gpus: Mapping[str, Iterable[int]]) -> str:
    """GPUs per node as people read them: "node-1 GPUs 0,1; node-2 GPUs 4" (not a Python dict)."""
    return "; ".join(f"{node} GPUs {','.join(str(i) for i in idx)}" for node, idx in gpus.items()) or "no GPUs"


def _failed(core: Launches, job_id: int, attempt: int, e: Exception, now: float) -> None:
    with core.changing() as conn:
        core.engine_end(job_id, now, True)
        store.update_attempt(
            conn, job_id, attempt, state=AttemptState.ENDED, ended_at=now, outcome=AttemptOutcome.LAUNCH_FAILED
        )
        msg = f"could not start: {e}"
        store.update_job(
            conn,
            job_id,
            state=JobState.FAILED,
            ended_at=now,
            reason={"rule": "launch_failed", "message": msg, "numbers": {}},
        )
        store.add_event(conn, now, "launch_failed", msg, job_id)
