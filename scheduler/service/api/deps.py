"""What every route depends on: the caller (from its bearer token) and the service core."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import httpx
import sqlalchemy as sa
from fastapi import Depends, Request
from pydantic import Field
from sqlalchemy.engine import RowMapping
from starlette.concurrency import run_in_threadpool

from scheduler.service.api.auth import Principal, Role, digest, hub_principal, reserved_name
from scheduler.service.api.errors import Unauthorized, Unavailable
from scheduler.service.core import telemetry
from scheduler.service.core.loop import Core
from scheduler.service.store.db import tokens

HUB_TIMEOUT_S = 5.0  # asking the hub who holds a token: longer than that, and the caller should hear why
# An id (or version) as the API takes it: 1 up to the largest integer a database column holds (SQLite INTEGER,
# PostgreSQL BIGINT). A larger one would fail inside the database driver (OverflowError: a 500), not answer 422.
MAX_DB_INT = 2**63 - 1
DbId = Annotated[int, Field(ge=1, le=MAX_DB_INT)]
# A route answering text/plain: with response_class=Response, its 200 is documented as text and its errors (JSON,
# app.ERRORS) as application/json; response_class=PlainTextResponse would document the errors as text too.
TEXT_OK: dict[int | str, dict[str, Any]] = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


async def core(request: Request) -> Core:
    """The service core. `async`: FastAPI runs a plain `def` dependency on a worker thread, a hop per request that
    was a tenth of the API's CPU under load."""
    c: Core = request.app.state.core
    return c


async def principal(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer <token>`; 401 without a valid, unrevoked token."""
    auth = request.headers.get("authorization", "")
    scheme, _, secret = auth.partition(" ")
    if scheme.lower() not in ("bearer", "token") or not secret.strip():  # JupyterHub clients say "token"
        raise Unauthorized("send an API token as 'Authorization: Bearer <token>' (see corral token create)")
    return telemetry.identified(await resolve_token(await core(request), secret.strip()))


async def resolve_token(c: Core, secret: str) -> Principal:
    """Who holds `secret`: a Corral token (cached, then the token table) or, when a hub is configured, a
    JupyterHub token. The API's header and the dashboard's cookie both come here, so they agree on every rule."""
    key = digest(secret)
    known = c.tokens.get(key, c.clock())
    if known is not None:
        return known
    now = c.clock()
    row = await run_in_threadpool(_token_row, c, key)  # a database read must not stall the event loop
    expires_at = None
    if row is not None:
        if row["expires_at"] is not None and row["expires_at"] <= now:
            raise Unauthorized("the API token has expired; ask for a new one (corral token create)")
        who, expires_at = Principal(row["user"], Role(row["role"]), row["scope"]), row["expires_at"]
    elif c.settings.hub_api_url:
        who = await _hub_user(c, secret)
    else:
        raise Unauthorized("the API token is not valid or was revoked")
    c.tokens.put(key, who, now, expires_at)
    return who


# The dashboard's session cookie: it holds the API token itself, HttpOnly and SameSite=Strict (docs/dashboard.md).
UI_COOKIE = "corral_ui"


async def cookie_principal(request: Request) -> Principal:
    """The caller of a dashboard page, from the cookie /ui/login set; 401 without a valid, unrevoked token."""
    secret = request.cookies.get(UI_COOKIE, "").strip()
    if not secret:
        raise Unauthorized("log in at /ui/login")
    return telemetry.identified(await resolve_token(await core(request), secret))


async def _hub_user(c: Core, secret: str) -> Principal:
    """Ask JupyterHub who holds this token (a person's hub token, e.g. inside a notebook)."""
    assert c.settings.hub_api_url is not None
    try:
        async with httpx.AsyncClient(timeout=HUB_TIMEOUT_S) as http:
            r = await http.get(
                f"{c.settings.hub_api_url.rstrip('/')}/user", headers={"Authorization": f"token {secret}"}
            )
    except httpx.HTTPError as e:
        raise Unavailable(
            f"JupyterHub at {c.settings.hub_api_url} did not answer ({e.__class__.__name__}); "
            "hub tokens cannot be checked now"
        ) from e
    if r.status_code in (401, 403, 404):
        raise Unauthorized("the token is neither a Corral token nor one JupyterHub accepts")
    if r.status_code != 200:
        raise Unavailable(f"JupyterHub answered {r.status_code} when asked who holds a token")
    user = r.json()
    if reserved_name(user["name"]):
        # Corral's own records use these names (the cluster's jobs are system:cluster's): a hub user so named
        # would own, read and cancel them.
        raise Unauthorized(f"the hub user {user['name']!r} has a name reserved for Corral's own records")
    return hub_principal(user["name"], user.get("groups", []), user.get("scopes", []), c.settings.hub_groups)


def _token_row(c: Core, key: str) -> RowMapping | None:
    """The live token whose digest is `key`. The lookup is by digest, so its timing tells nothing about the secret
    (a caller cannot steer a SHA-256 digest toward a stored one); the match is confirmed in constant time too."""
    with c.db.connect() as conn:
        row = (
            conn.execute(sa.select(tokens).where(tokens.c.digest == key, tokens.c.revoked.is_(False)))
            .mappings()
            .first()
        )
    return row if row is not None and hmac.compare_digest(row["digest"], key) else None


Caller = Annotated[Principal, Depends(principal)]
CoreDep = Annotated[Core, Depends(core)]
