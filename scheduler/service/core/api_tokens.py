"""API tokens through the API: create and revoke (each audited), under the rules of who may grant what."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from scheduler.service.api.auth import TEAM_GRANTABLE, NameRecord, Principal, Role, digest, new_secret
from scheduler.service.api.errors import Conflict, Forbidden, Invalid, NotFound
from scheduler.service.core.loop import Core
from scheduler.service.store import rows as store
from scheduler.service.store.db import approvals, jobs, model_versions, models, promotions, tokens


def create(
    core: Core, who: Principal, user: str, role: Role, scope: str | None, expires_in_days: float | None
) -> dict[str, Any]:
    """A new API token. Its secret is in this answer only; Corral keeps a hash."""
    if scope is not None and scope not in core.tree:
        raise Invalid(f"queue {scope!r} does not exist", "scope")
    if not who.may_grant(core.tree, role, scope):
        raise Forbidden(
            f"{who.user} ({who.role}) may not create a {role} token for {scope or 'every queue'}",
            "role" if role not in TEAM_GRANTABLE else "scope",
        )
    secret, now = new_secret(), core.clock()
    expires_at = None if expires_in_days is None else now + expires_in_days * 86400
    # Under the core's lock: two team admins claiming one new name at once must not both see it as new.
    with core.lock, core.db.begin() as conn:
        why = who.may_take_name(core.tree, user, name_record(conn, user), bool(core.settings.hub_api_url))
        if why is not None:
            raise Forbidden(f"{who.user} ({who.role}) may not create a token for {user!r}: {why}", "user")
        token_id = conn.execute(
            tokens.insert()
            .values(
                digest=digest(secret),
                user=user,
                role=role.value,
                scope=scope,
                created_at=now,
                created_by=who.user,
                revoked=False,
                expires_at=expires_at,
            )
            .returning(tokens.c.id)
        ).scalar_one()
        store.add_audit(
            conn, now, who.user, "token.create", f"token {token_id}", user=user, role=role.value, scope=scope
        )
    return {"id": token_id, "user": user, "role": role.value, "scope": scope, "token": secret, "expires_at": expires_at}


def revoke(core: Core, who: Principal, token_id: int) -> dict[str, Any]:
    """Revoke a token `who` may revoke (any other is answered as missing); never the last live platform-admin one."""
    now = core.clock()
    with core.lock, core.db.begin() as conn:
        row = conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).mappings().first()
        if row is None or not who.may_revoke(core.tree, row["role"], row["scope"]):
            raise NotFound(f"token {token_id} not found")
        if row["role"] == Role.PLATFORM_ADMIN and _live(row, now) and _live_admins(conn, now) <= 1:
            # Nobody could make another admin token through the API afterwards (`corral token create --local`
            # on the server is the only way back), so the last one stays.
            raise Conflict(
                f"token {token_id} is the last live platform-admin token: make another platform-admin "
                "token first, then revoke this one"
            )
        conn.execute(tokens.update().where(tokens.c.id == token_id).values(revoked=True))
        core.tokens.clear()
        store.add_audit(conn, now, who.user, "token.revoke", f"token {token_id}", user=row["user"])
    return {"id": token_id, "revoked": True}


def _live(row: Any, now: float) -> bool:
    return not row["revoked"] and (row["expires_at"] is None or row["expires_at"] > now)


def _live_admins(conn: sa.Connection, now: float) -> int:
    """Platform-admin tokens that work now (not revoked, not expired)."""
    return conn.execute(
        sa.select(sa.func.count())
        .select_from(tokens)
        .where(
            tokens.c.role == Role.PLATFORM_ADMIN.value,
            tokens.c.revoked.is_(False),
            sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > now),
        )
    ).scalar_one()


def name_record(conn: sa.Connection, name: str) -> NameRecord:
    """Everything `name` has stood for: its tokens (revoked and expired too), the queues of its jobs (sandboxes
    included) and models, and whether it requested or approved a promotion."""
    held = conn.execute(sa.select(tokens.c.role, tokens.c.scope).where(tokens.c.user == name)).all()
    queues = set(conn.execute(sa.select(jobs.c.queue).where(jobs.c.owner == name).distinct()).scalars())
    queues |= set(
        conn.execute(
            sa.select(models.c.queue).where(
                sa.or_(
                    models.c.created_by == name,
                    models.c.name.in_(sa.select(model_versions.c.model).where(model_versions.c.registered_by == name)),
                )
            )
        ).scalars()
    )
    promoted = conn.execute(sa.select(promotions.c.id).where(promotions.c.requester == name).limit(1)).first()
    approved = conn.execute(sa.select(approvals.c.promotion_id).where(approvals.c.approver == name).limit(1)).first()
    return NameRecord(
        tuple((r.role, r.scope) for r in held), frozenset(queues), promoted is not None or approved is not None
    )
