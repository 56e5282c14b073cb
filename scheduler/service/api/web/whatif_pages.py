"""/ui/whatif: the form (examples or uploads, policies, a job limit), a run's page, and its plots."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Annotated

import yaml
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from scheduler.engine.baselines import POLICIES
from scheduler.service.api import routes_cluster
from scheduler.service.api.auth import Principal
from scheduler.service.api.deps import CoreDep
from scheduler.service.api.errors import Forbidden, Invalid, NotFound, ServiceError
from scheduler.service.api.web.common import Viewer, check_csrf, error_page, page
from scheduler.service.api.web.whatif import (
    MAX_JOBS,
    MAX_UPLOAD,
    PLOTS,
    Busy,
    Inputs,
    WhatIf,
    example_bytes,
    examples,
    policies_of,
)
from scheduler.sim.inputs import InputError

router = APIRouter()
_made = threading.Lock()
MAX_DAYS = 90  # how far back "replay this cluster" reaches


def _runs(request: Request, core: CoreDep) -> WhatIf:
    """The app's what-if runs, made on first use (one worker thread per service)."""
    with _made:
        if getattr(request.app.state, "whatif", None) is None:
            request.app.state.whatif = WhatIf(core.settings.data_dir / "whatif")
        runs: WhatIf = request.app.state.whatif
        return runs


def _may_run(who: Principal) -> bool:
    # Trying quota changes is the work of those who make them: the same roles that may apply a queue tree.
    return who.may_change_queues()


async def _file(kind: str, choice: str, upload: UploadFile | None, text: str = "") -> tuple[str, bytes] | None:
    """One input from the form: an example file by name, an upload, or (queues only) text typed in."""
    if choice == "upload":
        if upload is None or not upload.filename:
            raise Invalid(f"choose a {kind} file to upload", kind)
        data = await upload.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise Invalid(f"the {kind} file is larger than {MAX_UPLOAD // 1024} KiB", kind)
        return upload.filename, data
    if choice == "text":
        if len(text) > MAX_UPLOAD:
            raise Invalid(f"the {kind} text is larger than {MAX_UPLOAD // 1024} KiB", kind)
        return "queues (typed in)", text.encode()
    if choice in ("", "none"):
        return None
    try:
        return choice, example_bytes(kind, choice)
    except InputError as e:
        raise Invalid(str(e), kind) from e


def _form(request: Request, who: Principal, runs: WhatIf, status: int = 200, error: str | None = None) -> HTMLResponse:
    return page(
        request,
        who,
        "whatif.html",
        status=status,
        examples=examples(),
        policies=POLICIES,
        runs=runs.mine(who),
        may_run=_may_run(who),
        max_jobs=MAX_JOBS,
        max_kib=MAX_UPLOAD // 1024,
        max_days=MAX_DAYS,
        error=error,
    )


@router.get("/whatif", response_class=HTMLResponse)
def whatif_form(request: Request, who: Viewer, core: CoreDep) -> HTMLResponse:
    return _form(request, who, _runs(request, core))


async def _start(
    request: Request, who: Principal, runs: WhatIf, csrf: str, inputs: Callable[[], Awaitable[Inputs]]
) -> Response:
    """Check the form and the caller, start a run on what `inputs` reads, and go to its page (the form again,
    with why, when it cannot start)."""
    try:
        check_csrf(request, csrf)
        if not _may_run(who):
            raise Forbidden(f"{who.user} ({who.role}) may not run what-ifs: platform and team admins do")
        run = runs.start(who, await inputs())
    except Busy as e:
        return _form(request, who, runs, 429, str(e))
    except ServiceError as e:
        if e.status == 403:
            return error_page(request, who, e)
        return _form(request, who, runs, e.status, e.message)
    return RedirectResponse(f"/ui/whatif/{run.id}", status_code=303)


@router.post("/whatif", response_class=HTMLResponse, response_model=None)
async def whatif_start(
    request: Request,
    who: Viewer,
    core: CoreDep,
    csrf: Annotated[str, Form()] = "",
    trace: Annotated[str, Form()] = "",
    cluster: Annotated[str, Form()] = "",
    queues: Annotated[str, Form()] = "none",
    queues_text: Annotated[str, Form()] = "",
    policy: Annotated[list[str] | None, Form()] = None,
    limit: Annotated[int, Form()] = 1000,
    trace_file: Annotated[UploadFile | None, File()] = None,
    cluster_file: Annotated[UploadFile | None, File()] = None,
    queues_file: Annotated[UploadFile | None, File()] = None,
) -> Response:
    async def inputs() -> Inputs:
        t = await _file("trace", trace, trace_file)
        c = await _file("cluster", cluster, cluster_file)
        if t is None or c is None:
            raise Invalid("choose a trace and a cluster file")
        q = await _file("queues", queues, queues_file, queues_text)
        return Inputs(t, c, q, policies_of(policy or []), max(1, min(limit, MAX_JOBS)))

    return await _start(request, who, _runs(request, core), csrf, inputs)


@router.post("/whatif/replay", response_class=HTMLResponse, response_model=None)
async def whatif_replay(
    request: Request,
    who: Viewer,
    core: CoreDep,
    csrf: Annotated[str, Form()] = "",
    days: Annotated[float, Form()] = 7,
    queues: Annotated[str, Form()] = "none",
    queues_text: Annotated[str, Form()] = "",
    policy: Annotated[list[str] | None, Form()] = None,
    limit: Annotated[int, Form()] = 1000,
    queues_file: Annotated[UploadFile | None, File()] = None,
) -> Response:
    """Replay the jobs this cluster recorded in the last `days` days on its own pools and queue tree (what
    GET /v1/usage/export gives: no export and upload), optionally with another queue file."""

    async def inputs() -> Inputs:
        if not 0 < days <= MAX_DAYS:
            raise Invalid(f"days: between 0 and {MAX_DAYS}, got {days:g}", "days")
        # The caller's own view of the records: a team admin replays its subtree only, as the export gives it.
        export = routes_cluster.export_usage(who, core, since=max(0.0, core.clock() - days * 86400))
        span = f"{days:g} day{'s' if days != 1 else ''}"
        if export["jobs"] == 0:
            raise Invalid(f"this cluster recorded no jobs in the last {span}", "days")
        t = (f"this cluster's jobs of the last {span} ({export['jobs']})", export["trace"].encode())
        c = ("this cluster's pools and queue tree", yaml.safe_dump(export["cluster"], sort_keys=False).encode())
        q = await _file("queues", queues, queues_file, queues_text)
        return Inputs(t, c, q, policies_of(policy or []), max(1, min(limit, MAX_JOBS)))

    return await _start(request, who, _runs(request, core), csrf, inputs)


@router.get("/whatif/{run_id}", response_class=HTMLResponse)
def whatif_run(request: Request, who: Viewer, core: CoreDep, run_id: str) -> HTMLResponse:
    run = _runs(request, core).get(who, run_id)
    if run is None:
        return error_page(request, who, NotFound(f"what-if run {run_id} not found"))
    return page(request, who, "whatif_run.html", run=run)


@router.get("/whatif/{run_id}/status")
def whatif_status(request: Request, who: Viewer, core: CoreDep, run_id: str) -> JSONResponse:
    run = _runs(request, core).get(who, run_id)
    return JSONResponse({"state": run.state if run is not None else "missing"})


@router.get("/whatif/{run_id}/{name}", response_model=None)
def whatif_plot(request: Request, who: Viewer, core: CoreDep, run_id: str, name: str) -> Response:
    run = _runs(request, core).get(who, run_id)
    if run is None or name not in PLOTS or not (run.outdir / name).is_file():
        return JSONResponse({"error": {"code": "not_found", "message": "no such plot"}}, status_code=404)
    return FileResponse(run.outdir / name, media_type="image/png")
