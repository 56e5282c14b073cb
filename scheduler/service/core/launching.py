"""Launching admitted attempts once their GPUs are free, several at once where the executor allows it.

Called under the Core's lock after the cycle's commit, so nothing else decides meanwhile. Only the executor's
launch() runs in worker threads (LaunchesInParallel); reading the jobs, the engine and every database write stay
on the calling thread, one short transaction per outcome as it comes, none of them around a network call.
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


def launch_ready(core: Launches, now: float) -> bool:
    """Launch admitted attempts whose GPUs no live process holds (a preempted job may still be exiting).
    True while some admitted attempt is still not launched (waiting for GPUs, or to be tried again)."""
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
    width = core.executor.launch_parallelism if isinstance(core.executor, LaunchesInParallel) else 1
    if width <= 1 or len(todo) <= 1:
        for a, launch in todo:
            waiting |= _record(core, a, launch, _start(core.executor, launch), now)
        return waiting
    errors: list[Exception] = []
    with ThreadPoolExecutor(min(width, len(todo)), thread_name_prefix="corral-launch") as pool:
        started = {pool.submit(_start, core.executor, launch): (a, launch) for a, launch in todo}
        for f in as_completed(started):  # recorded as each returns: a slow launch holds up no other
            a, launch = started[f]
            try:  # every outcome is recorded, whatever happens to one of them (a database error)
                waiting |= _record(core, a, launch, f.result(), now)
            except Exception as e:
                errors.append(e)
    if errors:
        raise errors[0]
    return waiting


def _ready(core: Launches) -> tuple[list[tuple[Mapping[Any, Any], Mapping[Any, Any]]], bool]:
    """Admitted attempts (oldest first) with their jobs, whose GPUs live attempts leave room on: a GPU takes whole
    jobs or shares summing to at most 1, a node's MIG slices of a profile no more attempts than it has; and
    whether other admitted attempts wait."""
    with core.db.connect() as conn:
        rows = list(
            conn.execute(
                sa.select(attempts)
                .where(attempts.c.state.in_((AttemptState.STARTING, *HOLDING)))
                .order_by(attempts.c.admitted_at)
            ).mappings()
        )
        specs = {
            j["id"]: j
            for j in conn.execute(sa.select(jobs).where(jobs.c.id.in_({a["job_id"] for a in rows}))).mappings()
        }
    held = _Held(core)
    for a in rows:
        if a["state"] in HOLDING:
            held.add(a, specs[a["job_id"]]["spec"])
    busy_jobs = {a["job_id"] for a in rows if a["state"] in HOLDING}
    ready = []
    for a in rows:
        spec = specs[a["job_id"]]["spec"]
        if a["state"] == AttemptState.STARTING and a["job_id"] not in busy_jobs and held.room(a, spec):
            ready.append(a)
            held.add(a, spec)  # launched together, so they must fit together
    waiting = sum(a["state"] == AttemptState.STARTING for a in rows) > len(ready)
    return [(a, specs[a["job_id"]]) for a in ready], waiting


class _Held:
    """What live and about-to-launch attempts hold: shares per GPU (a whole GPU is 1), MIG slices per profile."""

    def __init__(self, core: Launches) -> None:
        self.nodes = core.cluster.nodes
        self.shares: dict[tuple[str, int], float] = {}
        self.slices: dict[tuple[str, str], int] = {}

    @staticmethod
    def _share(spec: Mapping[str, Any]) -> float:
        gpus = spec.get("gpus", 1)
        return float(gpus) if isinstance(gpus, float) and 0 < gpus < 1 else 1.0

    def room(self, a: Mapping[Any, Any], spec: Mapping[str, Any]) -> bool:
        profile, share = spec.get("mig"), self._share(spec)
        for n, gs in a["placement"]:
            if profile is not None:
                info = self.nodes.get(n)
                if info is not None and self.slices.get((n, profile), 0) >= info.mig_counts().get(profile, 0):
                    return False
            if any(self.shares.get((n, g), 0.0) + share > 1 + SHARE_EPSILON for g in gs):
                return False
        return True

    def add(self, a: Mapping[Any, Any], spec: Mapping[str, Any]) -> None:
        profile, share = spec.get("mig"), self._share(spec)
        for n, gs in a["placement"]:
            if profile is not None:
                self.slices[(n, profile)] = self.slices.get((n, profile), 0) + 1
            for g in gs:
                self.shares[(n, g)] = self.shares.get((n, g), 0.0) + share


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
    """Write how a launch went; True when the attempt is still to launch (tried again next cycle)."""
    if isinstance(outcome, Unsure):
        return True
    job_id = int(launch.job_id)
    if isinstance(outcome, Exception):  # this job cannot start (no such workdir, ...): it fails alone
        _failed(core, job_id, a["attempt"], outcome, now)
        return False
    handle, ended = outcome
    if ended is not None:
        core.note_exit(ended)
    with core.writing() as conn:
        store.update_attempt(
            conn,
            job_id,
            a["attempt"],
            state=AttemptState.RUNNING,
            pid=handle.pid,
            proc_started=handle.started_at,
            started_at=now,
        )
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
