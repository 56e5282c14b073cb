"""`corral token create --local`: a token written straight into the service's database, without the API.

Whoever can open the database (on the server machine, its service account: the SQLite file, or the PostgreSQL URL
with its password) may make any token this way. It is the way back when admin access is lost: every platform-admin
token revoked in the database by hand, expired, or its secret forgotten. The API never lets the last live
platform-admin token be revoked, but it cannot stop the database being edited, nor a token expiring.
"""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from scheduler.service.api.auth import DEFAULT_TOKEN_DAYS as DEFAULT_DAYS
from scheduler.service.api.auth import Role, digest, new_secret, reserved_name
from scheduler.service.core import queues
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.store import rows as store
from scheduler.service.store.db import connect, tokens

DAY_S = 86400.0


class LocalTokenError(Exception):
    """The token could not be made: no database there, or a name no token may have."""


@dataclass(frozen=True)
class Made:
    id: int
    user: str
    role: Role
    scope: str | None
    secret: str
    expires_at: float | None


def local_actor() -> str:
    """Who the audit log names: the operating-system account that opened the database."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry and no $USER (some containers)
        return "local:unknown"


def open_database(settings: ServiceSettings) -> sa.Engine:
    """The service's database, which must exist already (made by `corral serve`): an empty file created by
    mistake in the wrong data directory would make a token the service never reads."""
    url = settings.url
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if not path or not Path(path).is_file():
            raise LocalTokenError(
                f"no database at {path}: give --data-dir or --database-url (CORRAL_DATA_DIR, "
                "CORRAL_DATABASE_URL) as `corral serve` has them"
            )
    db = connect(url)
    try:
        has_tables = sa.inspect(db).has_table(tokens.name)
    except sa.exc.SQLAlchemyError as e:
        db.dispose()
        raise LocalTokenError(f"cannot open the database: {e.__class__.__name__}: {e}") from e
    if not has_tables:
        db.dispose()
        raise LocalTokenError(
            f"{settings.url.split('://')[0]} database without Corral's tables: is this the "
            "service's database? (`corral serve` creates them)"
        )
    return db


def make(
    settings: ServiceSettings, user: str, role: str, scope: str | None, expires_in_days: float | None = DEFAULT_DAYS
) -> Made:
    """`corral token create --local`: open the database `settings` name, make the token, close it again."""
    try:
        the_role = Role(role)
    except ValueError as e:
        raise LocalTokenError(f"role {role!r}: one of {', '.join(r.value for r in Role)}") from e
    db = open_database(settings)
    try:
        return mint(db, user, the_role, scope, expires_in_days, local_actor())
    except sa.exc.SQLAlchemyError as e:
        raise LocalTokenError(f"the database refused the token: {e.__class__.__name__}") from e
    finally:
        db.dispose()


def mint(
    db: sa.Engine,
    user: str,
    role: Role,
    scope: str | None,
    expires_in_days: float | None,
    by: str,
    now: float | None = None,
) -> Made:
    """Insert a token and its audit entry in one transaction; returns it with its secret (shown once)."""
    if reserved_name(user):
        raise LocalTokenError(f"{user!r} is reserved for Corral's own records")
    if not user.strip():
        raise LocalTokenError("the user name is empty")
    now = time.time() if now is None else now
    secret = new_secret()
    expires_at = None if expires_in_days is None else now + expires_in_days * DAY_S
    with db.begin() as conn:
        if scope is not None:
            current = queues.latest(conn)
            if current is None or scope not in {q["name"] for q in current["document"]["queues"]}:
                raise LocalTokenError(f"queue {scope!r} does not exist")
        token_id: int = conn.execute(
            tokens.insert()
            .values(
                digest=digest(secret),
                user=user,
                role=role.value,
                scope=scope,
                created_at=now,
                created_by=by,
                revoked=False,
                expires_at=expires_at,
            )
            .returning(tokens.c.id)
        ).scalar_one()
        store.add_audit(
            conn, now, by, "token.create", f"token {token_id}", user=user, role=role.value, scope=scope, local=True
        )
    return Made(token_id, user, role, scope, secret, expires_at)
