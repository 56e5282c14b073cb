"""Job pages: the list with filters, a job with its events, explanation and live logs, submit and cancel forms.

Reads call the /v1 job functions in-process with the caller's Principal; submit goes through the same intake as
POST /v1/jobs and cancel through Core.cancel, so every rule (who may see, submit, cancel) is the API's own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError

from scheduler.service.api import routes_jobs
from scheduler.service.api.auth import Principal
from scheduler.service.api.deps import CoreDep
from scheduler.service.api.errors import ServiceError
from scheduler.service.api.web.common import Viewer, check_csrf, error_page, page
from scheduler.service.core.loop import Core
from scheduler.service.core.specs import JobSubmit
from scheduler.service.core.states import FINISHED

router = APIRouter()
PAGE = 50


def _visible_queues(who: Principal, core: Core) -> list[str]:
    with core.lock:
        return sorted(who.visible(core.tree, core.tree.queues))


def _submittable(who: Principal, core: Core) -> list[str]:
    with core.lock:
        return sorted(q.name for q in core.tree.leaves if who.may_submit(core.tree, q.name))


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    who: Viewer,
    core: CoreDep,
    queue: str = "",
    state: str = "",
    owner: str = "",
    label: str = "",
    before: int | None = None,
) -> HTMLResponse:
    filters = {"queue": queue, "state": state, "owner": owner, "label": label}
    try:
        listed = routes_jobs.list_jobs(
            who,
            core,
            queue=queue or None,
            state=[state] if state else None,
            owner=owner or None,
            label=[label] if label else None,
            limit=PAGE,
            before=before,
        )["jobs"]
    except ServiceError as e:  # a bad filter (state, label): the page says which, with the form to fix it
        return page(
            request,
            who,
            "jobs.html",
            status=e.status,
            jobs=[],
            filters=filters,
            error=e.message,
            queues=_visible_queues(who, core),
            states=routes_jobs.STATES,
            older=None,
        )
    older = listed[-1]["id"] if len(listed) == PAGE else None
    return page(
        request,
        who,
        "jobs.html",
        jobs=listed,
        filters=filters,
        queues=_visible_queues(who, core),
        states=routes_jobs.STATES,
        older=older,
        error=None,
    )


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job(request: Request, who: Viewer, core: CoreDep) -> HTMLResponse:
    return page(request, who, "submit.html", queues=_submittable(who, core), form={}, errors=[])


@router.post("/jobs", response_class=HTMLResponse, response_model=None)
async def submit(
    request: Request,
    who: Viewer,
    core: CoreDep,
    csrf: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "job",
    queue: Annotated[str, Form()] = "",
    command: Annotated[str, Form()] = "",
    gpus: Annotated[str, Form()] = "1",
    workers: Annotated[str, Form()] = "1",
    priority: Annotated[str, Form()] = "0",
    max_runtime: Annotated[str, Form()] = "",
    preemptible: Annotated[str | None, Form()] = None,
) -> Response:
    try:
        check_csrf(request, csrf)
    except ServiceError as e:
        return error_page(request, who, e)
    form = {
        "name": name,
        "queue": queue,
        "command": command,
        "gpus": gpus,
        "workers": workers,
        "priority": priority,
        "max_runtime": max_runtime,
        "preemptible": preemptible is not None,
    }
    errors: list[str] = []
    try:
        # The command is one string, run by /bin/sh -c, as `corral submit -- "..."` does with a single string.
        sub = JobSubmit.model_validate(
            {**{k: v for k, v in form.items() if v != ""}, "max_runtime": max_runtime or None}
        )
        job, _ = await core.intake.submit_async(who, sub)
    except ValidationError as e:
        errors = [f"{'.'.join(str(p) for p in err['loc']) or 'form'}: {err['msg']}" for err in e.errors()]
    except ServiceError as e:
        errors = [f"{e.where}: {e.message}" if e.where else e.message]
    if errors:
        return page(request, who, "submit.html", status=422, queues=_submittable(who, core), form=form, errors=errors)
    return RedirectResponse(f"/ui/jobs/{job['id']}", status_code=303)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, who: Viewer, core: CoreDep, job_id: int) -> HTMLResponse:
    try:
        job = routes_jobs.get_job(job_id, who, core)
        evts = routes_jobs.job_events(job_id, who, core)["events"]
        why = routes_jobs.explain(job_id, who, core)
    except ServiceError as e:
        return error_page(request, who, e)
    with core.lock:
        may_cancel = who.may_cancel(core.tree, job["queue"], job["owner"]) and job["state"] not in FINISHED
    return page(
        request,
        who,
        "job.html",
        job=job,
        events=evts,
        explain=why,
        may_cancel=may_cancel,
        finished=job["state"] in FINISHED,
    )


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse, response_model=None)
def cancel(request: Request, who: Viewer, core: CoreDep, job_id: int, csrf: Annotated[str, Form()] = "") -> Response:
    try:
        check_csrf(request, csrf)
        core.cancel(who, job_id)
    except ServiceError as e:
        return error_page(request, who, e)
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/status")
def status(who: Viewer, core: CoreDep, job_id: int) -> JSONResponse:
    """What the job page's script polls: the state, the attempt whose log to follow, and the reason."""
    job = routes_jobs.get_job(job_id, who, core)
    body: dict[str, Any] = {
        "state": job["state"],
        "attempt": job["attempt"],
        "reason": job["reason"],
        "finished": job["state"] in FINISHED,
    }
    return JSONResponse(body)


@router.get("/jobs/{job_id}/logs")
async def logs(
    who: Viewer,
    core: CoreDep,
    job_id: int,
    stream: Literal["stdout", "stderr"] = "stdout",
    attempt: Annotated[int | None, Query(ge=1)] = None,
    follow: bool = False,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """The API's log endpoint behind the session cookie: the page's script cannot send a bearer token (the cookie
    is HttpOnly, so no script can read the token at all)."""
    return await routes_jobs.logs(job_id, who, core, stream=stream, attempt=attempt, follow=follow, offset=offset)
