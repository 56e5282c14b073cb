"""/v1/sandboxes: open a notebook sandbox now (or be told at once why not), list them, look at one, close them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy.engine import RowMapping

from scheduler.service.api import models as api
from scheduler.service.api.auth import Principal
from scheduler.service.api.deps import Caller, CoreDep, DbId
from scheduler.service.api.errors import NotFound
from scheduler.service.api.redact import Redactor
from scheduler.service.core import queries
from scheduler.service.core.loop import Core
from scheduler.service.core.sandboxes import SandboxRequest, open_sandbox, sandbox_view

router = APIRouter(tags=["sandboxes"])


@router.post("/sandboxes", status_code=201, response_model=api.SandboxView)
def create(req: SandboxRequest, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Start a sandbox within the queue's guarantee (counting its non-preemptible GPUs), at priority
    sandbox_priority; 409 at once, saying whether the guarantee or the room is short, with the numbers."""
    return open_sandbox(core, who, req)


@router.get("/sandboxes", response_model=api.SandboxList)
def list_sandboxes(who: Caller, core: CoreDep) -> dict[str, Any]:
    """Open sandboxes (admitted or running) the caller may see."""
    with core.db.connect() as conn:
        shown = queries.open_sandboxes(conn, who, core.tree)
        hide = Redactor(core, conn, who)  # a start's reason names the jobs it preempted
        hide.learn(v["reason"] for v in shown)
        return {"sandboxes": [{**v, "reason": hide.value(v["reason"])} for v in shown]}


@router.get("/sandboxes/{job_id}", response_model=api.SandboxView)
def get(job_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    """One sandbox, with where its server listens once it runs (`address`, `url`): what the hub connects to."""
    view = sandbox_view(core, _sandbox(core, who, job_id))
    with core.db.connect() as conn:
        return {**view, "reason": Redactor(core, conn, who).value(view["reason"])}


@router.delete("/sandboxes/{job_id}", response_model=api.JobView)
def close(job_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Stop a sandbox: its GPUs are free for others at once (its process gets SIGTERM)."""
    _sandbox(core, who, job_id)
    return core.cancel(who, job_id)


def _sandbox(core: Core, who: Principal, job_id: int) -> RowMapping:
    """The sandbox, if `who` may see it; any other job is answered like a missing one."""
    with core.db.connect() as conn:
        row = core.readable(conn, who, job_id)
    if row["spec"].get("kind") != "sandbox":
        raise NotFound(f"sandbox {job_id} not found")
    return row
