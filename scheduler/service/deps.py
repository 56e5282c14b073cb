"""What every route depends on: the caller (from its bearer token) and the service core."""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, Request
from sqlalchemy.engine import RowMapping
from starlette.concurrency import run_in_threadpool

from scheduler.service.auth import Principal, Role, digest
from scheduler.service.core import Core
from scheduler.service.db import tokens
from scheduler.service.errors import Unauthorized


def core(request: Request) -> Core:
    c: Core = request.app.state.core
    return c


async def principal(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer <token>`; 401 without a valid, unrevoked token."""
    auth = request.headers.get("authorization", "")
    scheme, _, secret = auth.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("send an API token as 'Authorization: Bearer <token>' (see corral token create)")
    c = core(request)
    key = digest(secret.strip())
    known = c.tokens.get(key, c.clock())
    if known is not None:
        return known
    row = await run_in_threadpool(_token_row, c, key)  # a database read must not stall the event loop
    if row is None:
        raise Unauthorized("the API token is not valid or was revoked")
    who = Principal(row["user"], Role(row["role"]), row["scope"])
    c.tokens.put(key, who, c.clock())
    return who


def _token_row(c: Core, key: str) -> RowMapping | None:
    with c.db.connect() as conn:
        return conn.execute(sa.select(tokens).where(tokens.c.digest == key,
                                                    tokens.c.revoked.is_(False))).mappings().first()


Caller = Annotated[Principal, Depends(principal)]
CoreDep = Annotated[Core, Depends(core)]
