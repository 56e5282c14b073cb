"""/v1 queues (tree, apply, history, rollback), pools and nodes, usage (and its export), tokens and the audit log."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import Field

from scheduler.service import api_models as api
from scheduler.service import queues, store, usage, views
from scheduler.service.auth import DEFAULT_TOKEN_DAYS, TEAM_GRANTABLE, NameRecord, Principal, Role, digest, new_secret
from scheduler.service.core import Core
from scheduler.service.db import (
    approvals,
    audit,
    jobs,
    model_versions,
    models,
    promotions,
    queue_versions,
    tokens,
)
from scheduler.service.deps import Caller, CoreDep, DbId
from scheduler.service.edge import Body
from scheduler.service.errors import Conflict, Forbidden, Invalid, NotFound

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
    expires_in_days: float | None = Field(DEFAULT_TOKEN_DAYS, gt=0, le=3650, description=(
        "Days until the token stops working (default 90); null: never (for service accounts, say so in review)."))


@router.get("/queues", tags=["queues"])
def queue_tree(who: Caller, core: CoreDep) -> api.QueueTreeView:
    """The queues the caller may see: quota, limit, weight per pool, live fair share, usage (all of it, and the
    non-preemptible part the guarantee rule counts) and backlog."""
    return views.queue_tree(core, who)


@router.post("/queues/apply", tags=["queues"], response_model=api.QueuesApplied,
             response_model_exclude_unset=True)
def apply(body: Apply, who: Caller, core: CoreDep) -> dict[str, Any]:
    """Replace the whole tree atomically after validating it; answers the diff (and nothing changes on dry_run)."""
    return core.apply_queues(who, body.document, body.comment, body.dry_run, body.expected_version)


@router.post("/queues/rollback", tags=["queues"], response_model=api.QueuesApplied,
             response_model_exclude_unset=True)
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
    with core.db.connect() as conn:
        for p in out:
            for n in p["nodes"]:
                for g in n["gpus"]:
                    if g["job"] is not None:
                        job = store.job_row(conn, g["job"])
                        if job is None or not who.may_read_job(core.tree, job["queue"], job["owner"]):
                            g["job"] = "hidden"
    return {"pools": out}


@router.get("/usage", tags=["usage"], response_model=api.Usage)
def get_usage(who: Caller, core: CoreDep, since: Annotated[float | None, Query(ge=0)] = None,
              until: float | None = None) -> dict[str, Any]:
    """GPU-hours per queue and user over [since, until] (epoch seconds; default: since Corral was set up,
    until now)."""
    since, end, visible = _usage_range(who, core, since, until)
    with core.db.connect() as conn:
        return usage.usage(conn, since, end, visible, core.clock())


def _usage_range(who: Principal, core: Core, since: float | None, until: float | None
                 ) -> tuple[float, float, set[str] | None]:
    """[since, until] with their defaults (since Corral was set up, until now), and the queues the caller sees."""
    end = core.clock() if until is None else until
    if math.isnan(end):
        raise Invalid("until is not a number", "until")
    if since is None:
        with core.db.connect() as conn:
            since = conn.execute(sa.select(sa.func.min(queue_versions.c.created_at))).scalar_one()
    if end < since:
        raise Invalid(f"until ({end}) is before since ({since})", "until")
    visible = None if who.admin or who.scope is None else set(who.visible(core.tree, core.tree.queues))
    return since, end, visible


@router.get("/usage/export", tags=["usage"], response_model=api.UsageExport)
def export_usage(who: Caller, core: CoreDep, format: Literal["trace"] = "trace",
                 since: Annotated[float | None, Query(ge=0)] = None, until: float | None = None) -> dict[str, Any]:
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
    if body.scope is not None and body.scope not in core.tree:
        raise Invalid(f"queue {body.scope!r} does not exist", "scope")
    if not who.may_grant(core.tree, body.role, body.scope):
        raise Forbidden(f"{who.user} ({who.role}) may not create a {body.role} token for "
                        f"{body.scope or 'every queue'}", "role" if body.role not in TEAM_GRANTABLE else "scope")
    secret, now = new_secret(), core.clock()
    expires_at = None if body.expires_in_days is None else now + body.expires_in_days * 86400
    # Under the core's lock: two team admins claiming one new name at once must not both see it as new.
    with core.lock, core.db.begin() as conn:
        why = who.may_take_name(core.tree, body.user, name_record(conn, body.user), bool(core.settings.hub_api_url))
        if why is not None:
            raise Forbidden(f"{who.user} ({who.role}) may not create a token for {body.user!r}: {why}", "user")
        token_id = conn.execute(tokens.insert().values(
            digest=digest(secret), user=body.user, role=body.role.value, scope=body.scope, created_at=now,
            created_by=who.user, revoked=False, expires_at=expires_at).returning(tokens.c.id)).scalar_one()
        store.add_audit(conn, now, who.user, "token.create", f"token {token_id}", user=body.user,
                        role=body.role.value, scope=body.scope)
    return {"id": token_id, "user": body.user, "role": body.role.value, "scope": body.scope, "token": secret,
            "expires_at": expires_at}


@router.delete("/tokens/{token_id}", tags=["tokens"], response_model=api.TokenRevoked)
def revoke_token(token_id: DbId, who: Caller, core: CoreDep) -> dict[str, Any]:
    now = core.clock()
    with core.lock, core.db.begin() as conn:
        row = conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).mappings().first()
        if row is None or not who.may_revoke(core.tree, row["role"], row["scope"]):
            raise NotFound(f"token {token_id} not found")
        if row["role"] == Role.PLATFORM_ADMIN and _live(row, now) and _live_admins(conn, now) <= 1:
            # Nobody could make another admin token through the API afterwards (`corral token create --local`
            # on the server is the only way back), so the last one stays.
            raise Conflict(f"token {token_id} is the last live platform-admin token: make another platform-admin "
                           "token first, then revoke this one")
        conn.execute(tokens.update().where(tokens.c.id == token_id).values(revoked=True))
        core.tokens.clear()
        store.add_audit(conn, now, who.user, "token.revoke", f"token {token_id}", user=row["user"])
    return {"id": token_id, "revoked": True}


def _live(row: Any, now: float) -> bool:
    return not row["revoked"] and (row["expires_at"] is None or row["expires_at"] > now)


def _live_admins(conn: sa.Connection, now: float) -> int:
    """Platform-admin tokens that work now (not revoked, not expired)."""
    return conn.execute(sa.select(sa.func.count()).select_from(tokens).where(
        tokens.c.role == Role.PLATFORM_ADMIN.value, tokens.c.revoked.is_(False),
        sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > now))).scalar_one()


def name_record(conn: sa.Connection, name: str) -> NameRecord:
    """Everything `name` has stood for: its tokens (revoked and expired too), the queues of its jobs (sandboxes
    included) and models, and whether it requested or approved a promotion."""
    held = conn.execute(sa.select(tokens.c.role, tokens.c.scope).where(tokens.c.user == name)).all()
    queues = set(conn.execute(sa.select(jobs.c.queue).where(jobs.c.owner == name).distinct()).scalars())
    queues |= set(conn.execute(sa.select(models.c.queue).where(sa.or_(
        models.c.created_by == name,
        models.c.name.in_(sa.select(model_versions.c.model).where(model_versions.c.registered_by == name))))
    ).scalars())
    promoted = conn.execute(sa.select(promotions.c.id).where(promotions.c.requester == name).limit(1)).first()
    approved = conn.execute(sa.select(approvals.c.promotion_id).where(approvals.c.approver == name).limit(1)).first()
    return NameRecord(tuple((r.role, r.scope) for r in held), frozenset(queues),
                      promoted is not None or approved is not None)


@router.get("/audit", tags=["audit"], response_model=api.AuditLog)
def audit_log(who: Caller, core: CoreDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Every change: who, what, when (platform admins only)."""
    if not who.admin:
        raise Forbidden("only platform admins read the audit log")
    with core.db.connect() as conn:
        rows = conn.execute(sa.select(audit).order_by(audit.c.id.desc()).limit(limit)).mappings()
        return {"entries": [dict(r) for r in rows]}
