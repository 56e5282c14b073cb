"""/v1/jobs: submit, list, get, cancel, logs (with follow), events, explain."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from scheduler.service.api import models as api
from scheduler.service.api.deps import TEXT_OK, Caller, CoreDep, DbId
from scheduler.service.api.errors import Invalid, NotStarted
from scheduler.service.api.redact import Redactor
from scheduler.service.api.views import live_reasons, reason_now
from scheduler.service.core import queries
from scheduler.service.core.loop import Core
from scheduler.service.core.specs import JobSubmit
from scheduler.service.core.states import FINISHED, AttemptState, JobState

router = APIRouter(tags=["jobs"])
STATES = tuple(JobState)
FOLLOW_POLL_S = 0.2  # how often a followed log is re-read: lines show up within this
LOG_CHUNK = 1 << 20  # bytes per read of a log: a large log streams instead of sitting in memory
log = logging.getLogger("corral.api")


@router.post("/jobs", status_code=201, response_model=api.JobView)
async def submit(sub: JobSubmit, who: Caller, core: CoreDep, response: Response) -> dict[str, Any]:
    """Queue a job. A repeated idempotency key returns the first job (200) instead of a new one (201)."""
    if sub.kind != "job":
        # A sandbox is non-preemptible and above batch priority: only /v1/sandboxes checks the team's guarantee first.
        raise Invalid(
            "kind sandbox is opened through POST /v1/sandboxes, which checks the team's guarantee; "
            "/v1/jobs takes batch jobs only (kind: job)",
            "kind",
        )
    job, created = await core.intake.submit_async(who, sub)
    log.info(
        "job %s %s by %s",
        job["id"],
        "submitted" if created else "resubmitted (same idempotency key)",
        who.user,
        extra={"job_id": job["id"], "queue": job["queue"]},
    )
    if not created:
        response.status_code = 200
    return job


@router.get("/jobs", response_model=api.JobList)
def list_jobs(
    who: Caller,
    core: CoreDep,
    queue: str | None = None,
    state: Annotated[list[str] | None, Query()] = None,
    owner: str | None = None,
    label: Annotated[list[str] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: DbId | None = None,
) -> dict[str, Any]:
    """Jobs the caller may see, newest first; `before` (an id) pages back."""
    for s in state or []:
        if s not in STATES:
            raise Invalid(f"unknown state {s!r}; one of {', '.join(STATES)}", "state")
    wanted = dict(_label(x) for x in label or [])
    with core.lock:
        visible = set(who.visible(core.tree, core.tree.queues))
    out = queries.job_page(core, who, visible, queue, state, owner, before, limit, wanted)
    live_reasons(core, out)  # why each waits now, as explain says; the lock is not taken inside a connection
    with core.db.connect() as conn:
        hide = Redactor(core, conn, who)
        hide.learn(v["reason"] for v in out)  # every id the page names, in one look-up
        for v in out:
            v["reason"] = hide.value(v["reason"])
    return {"jobs": out}


def _label(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise Invalid(f"label filter {text!r} must be key=value", "label")
    return k, v


@router.get("/jobs/{job_id}", response_model=api.JobDetail)
def get_job(job_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    view = queries.readable_job(core, who, job_id)
    live_reasons(core, [view])
    with core.db.connect() as conn:
        view["reason"] = Redactor(core, conn, who).value(view["reason"])
        view["attempts"] = queries.attempts_of(conn, job_id)
    return view


@router.post("/jobs/{job_id}/cancel", response_model=api.JobView)
def cancel(job_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    return core.cancel(who, job_id)


@router.delete("/jobs/{job_id}", response_model=api.JobView)
def delete(job_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    """The same as POST /jobs/{id}/cancel."""
    return core.cancel(who, job_id)


@router.get("/jobs/{job_id}/events", response_model=api.EventList)
def job_events(job_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    with core.db.connect() as conn:
        core.readable(conn, who, job_id)
        rows = queries.events_of(conn, job_id)
        hide = Redactor(core, conn, who)
        hide.learn([r["message"], r["data"]] for r in rows)
        return {"events": [{**r, "message": hide.value(r["message"]), "data": hide.value(r["data"])} for r in rows]}


@router.get("/jobs/{job_id}/explain", response_model=api.Explanation)
def explain(job_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Why the job is where it is: for a pending job the rule that blocks it, with its numbers; the reasons
    of every preemption it suffered."""
    with core.db.connect() as conn:
        job = core.readable(conn, who, job_id)
        preempted = [
            r["data"].get("reason") | {"at": r["at"], "by": r["data"].get("by"), "cause": r["data"].get("cause")}
            for r in queries.events_of(conn, job_id, "preempted")
        ]
    with core.lock:
        reason = reason_now(core, job_id, job["reason"])
    with core.db.connect() as conn:  # after the lock: the redactor takes it to read the tree
        hide = Redactor(core, conn, who)
        hide.learn([reason, preempted])
        reason, preempted = hide.value(reason), hide.value(preempted)
    return {"job": job_id, "state": job["state"], "reason": reason, "preemptions": preempted}


@router.get("/jobs/{job_id}/logs", response_class=Response, responses=TEXT_OK)
async def logs(
    job_id: DbId,
    who: Caller,
    core: CoreDep,
    stream: Literal["stdout", "stderr"] = "stdout",
    attempt: Annotated[int | None, Query(ge=1)] = None,
    follow: bool = False,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """The attempt's output (default: the latest) from byte `offset`. With follow, the answer streams until the
    attempt ends; an attempt admitted but not launched yet is waited for."""
    job = await run_in_threadpool(_readable, core, who, job_id)  # database and files: off the event loop
    number = attempt or job["attempt"]
    if number < 1:
        if job["state"] in FINISHED:
            raise NotStarted(f"job {job_id} was {job['state']} before it started: it never ran, so it has no logs")
        raise NotStarted(f"job {job_id} has not started yet, so it has no logs")
    path = core.executor.logs(str(job_id), number)[0 if stream == "stdout" else 1]
    if not follow:
        if not os.path.exists(path):
            raise NotStarted(f"no {stream} yet for attempt {number} of job {job_id}")
        return StreamingResponse(_chunks(path, offset), media_type="text/plain")
    return StreamingResponse(_follow(core, job_id, number, path, offset), media_type="text/plain")


def _readable(core: Core, who: Any, job_id: int) -> Any:
    with core.db.connect() as conn:
        return core.readable(conn, who, job_id)


def _read(path: str, pos: int) -> bytes:
    """At most LOG_CHUNK bytes from `pos` (b"" when the file is not there yet): a large log never sits in memory."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            return f.read(LOG_CHUNK)
    except FileNotFoundError:
        return b""


def _chunks(path: str, pos: int) -> Iterator[bytes]:
    while chunk := _read(path, pos):  # a plain iterator: Starlette reads it in a worker thread
        pos += len(chunk)
        yield chunk


async def _follow(core: Core, job_id: int, attempt: int, path: str, pos: int) -> AsyncIterator[bytes]:
    while True:
        running = await run_in_threadpool(core.executor.alive, str(job_id), attempt)
        chunk = await run_in_threadpool(_read, path, pos)
        if chunk:
            pos += len(chunk)
            yield chunk
            continue
        if not running and not await run_in_threadpool(_launching, core, job_id, attempt):
            return
        await asyncio.sleep(FOLLOW_POLL_S)


def _launching(core: Core, job_id: int, attempt: int) -> bool:
    """The attempt is admitted and its process not launched yet (it waits for GPUs to be left)."""
    return queries.attempt_state(core, job_id, attempt) == AttemptState.STARTING
