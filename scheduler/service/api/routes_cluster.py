"""/v1 queues (tree, apply, history, rollback), pools and nodes, usage (and its export), tokens and the audit log."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import Field

from scheduler.service.api import models as api
from scheduler.service.api import views
from scheduler.service.api.auth import DEFAULT_TOKEN_DAYS, Principal, Role
from scheduler.service.api.deps import Caller, CoreDep, DbId
from scheduler.service.api.edge import Body
from scheduler.service.api.errors import Forbidden, Invalid
from scheduler.service.core import api_tokens, queries, queues, usage
from scheduler.service.core.loop import Core

router = APIRouter()


class Apply(Body):
    document: dict[str, Any] = Field(description="The whole tree: {queues: [...]}, as in queues.yaml.")
    comment: str = ""
    dry_run: bool = Field(False, description="Validate and show the diff without applying it.")
    expected_version: DbId | None = Field(None, description="Apply only if the tree is still at this version.")


class Rollback(Body):
    version: DbId


class TokenRequest(Body):
    user: str = Field(min_length=1, max_length=200)
    role: Role
    scope: str | None = Field(None, description="A queue: the role applies to its subtree. None: everything.")
    expires_in_days: float | None = Field(
        DEFAULT_TOKEN_DAYS,
        gt=0,
        le=3650,
        description=(
            "Days until the token stops working (default 90); null: never (for service accounts, say so in review)."
        ),
    )


@router.get("/queues", tags=["queues"])
def queue_tree(who: Caller, core: CoreDep) -> api.QueueTreeView:
    """The queues the caller may see: quota, limit, weight per pool, live fair share, usage (all of it, and the
    non-preemptible part the guarantee rule counts) and backlog."""
    return views.queue_tree(core, who)


@router.post("/queues/apply", tags=["queues"], response_model=api.QueuesApplied, response_model_exclude_unset=True)
def apply(body: Apply, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Replace the whole tree atomically after validating it; answers the diff (and nothing changes on dry_run)."""
    return core.apply_queues(who, body.document, body.comment, body.dry_run, body.expected_version)


@router.post("/queues/rollback", tags=["queues"], response_model=api.QueuesApplied, response_model_exclude_unset=True)
def rollback(body: Rollback, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Apply an earlier version again (as a new version, so history only grows)."""
    return core.rollback_queues(who, body.version)


@router.get("/queues/history", tags=["queues"], response_model=api.History)
def history(who: Caller, core: CoreDep) -> dict[str, Any]:
    """Every version with author, time and comment; a scoped caller sees only the queues it may see."""
    with core.db.connect() as conn:
        versions = queues.history(conn)
    if not (who.admin or who.scope is None):
        for v in versions:
            v["document"] = {"queues": [q for q in v["document"]["queues"] if who.covers(core.tree, q["name"])]}
    return {"versions": versions}


@router.get("/pools", tags=["pools"], response_model=api.PoolList)
def pools(who: Caller, core: CoreDep) -> dict[str, Any]:
    """Pools, nodes and GPUs, and which job holds each GPU (only job ids of jobs the caller may see)."""
    out = views.pools(core)
    gpus = [g for p in out for n in p["nodes"] for g in n["gpus"] if g["job"] is not None]
    shares = [s for g in gpus for s in g["shares"]]
    mig = [m for p in out for n in p["nodes"] for m in n["mig"]]
    seen = {g["job"] for g in gpus} | {s["job"] for s in shares} | {j for m in mig for j in m["jobs"]}
    with core.db.connect() as conn:
        hidden = queries.unreadable_jobs(conn, who, core.tree, seen)
    for item in (*gpus, *shares):
        if item["job"] in hidden:
            item["job"] = "hidden"
    for m in mig:
        m["jobs"] = ["hidden" if j in hidden else j for j in m["jobs"]]
    return {"pools": out}


@router.get("/usage", tags=["usage"], response_model=api.Usage)
def get_usage(
    who: Caller, core: CoreDep, since: Annotated[float | None, Query(ge=0)] = None, until: float | None = None
) -> dict[str, Any]:
    """GPU-hours per queue and user over [since, until] (epoch seconds; default: since Corral was set up,
    until now)."""
    since, end, visible = _usage_range(who, core, since, until)
    with core.db.connect() as conn:
        return usage.usage(conn, since, end, visible, core.clock())


def _usage_range(
    who: Principal, core: Core, since: float | None, until: float | None
) -> tuple[float, float, set[str] | None]:
    """[since, until] with their defaults (since Corral was set up, until now), and the queues the caller sees."""
    end = core.clock() if until is None else until
    if math.isnan(end):
        raise Invalid("until is not a number", "until")
    if since is None:
        with core.db.connect() as conn:
            since = queries.set_up_at(conn)
    if end < since:
        raise Invalid(f"until ({end}) is before since ({since})", "until")
    visible = None if who.admin or who.scope is None else set(who.visible(core.tree, core.tree.queues))
    return since, end, visible


@router.get("/usage/export", tags=["usage"], response_model=api.UsageExport)
def export_usage(
    who: Caller,
    core: CoreDep,
    format: Literal["trace"] = "trace",
    since: Annotated[float | None, Query(ge=0)] = None,
    until: float | None = None,
) -> dict[str, Any]:
    """The range as simulator inputs (SIMULATOR.md): `trace` (the CSV of jobs submitted in it, with their recorded
    runtimes), `cluster` (pools, the queue tree in force, settings), and recorded `demand` per leaf queue and pool.
    Like /v1/usage, a scoped caller gets its own queues only, and its subtree as the tree (`scope` says so)."""
    since, end, visible = _usage_range(who, core, since, until)
    with core.db.connect() as conn:
        current = queues.latest(conn)
        assert current is not None
        out = usage.export_trace(conn, since, end, visible, core.clock(), current["document"], core.engine_settings)
    return {**out, "scope": None if visible is None else who.scope}


@router.post("/tokens", status_code=201, tags=["tokens"], response_model=api.TokenCreated)
def create_token(body: TokenRequest, who: Caller, core: CoreDep) -> dict[str, Any]:
    """A new API token. Its secret is in this answer only; Corral keeps a hash."""
    return api_tokens.create(core, who, body.user, body.role, body.scope, body.expires_in_days)


@router.delete("/tokens/{token_id}", tags=["tokens"], response_model=api.TokenRevoked)
def revoke_token(token_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    return api_tokens.revoke(core, who, token_id)


@router.get("/audit", tags=["audit"], response_model=api.AuditLog)
def audit_log(who: Caller, core: CoreDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Every change: who, what, when (platform admins only)."""
    if not who.admin:
        raise Forbidden("only platform admins read the audit log")
    with core.db.connect() as conn:
        return {"entries": queries.audit_entries(conn, limit)}
