"""`corral db upgrade | downgrade | current | history`: the service database's schema (Alembic migrations).

They use the service's own settings (CORRAL_DATABASE_URL, CORRAL_DATA_DIR, the file CORRAL_CONFIG), so the
Helm chart's pre-install/pre-upgrade hook runs `corral db upgrade` with the environment the Deployment has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from scheduler.cli.client import fail, note

db_app = typer.Typer(
    help="The service database's schema: upgrade (before a new version starts), downgrade, current.",
    no_args_is_help=True,
)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        help="SQLAlchemy URL (default: the service's database_url setting, CORRAL_DATABASE_URL).", show_default=False
    ),
]
DataDir = Annotated[
    Path | None, typer.Option(help="The service's data dir (its SQLite file, when no URL).", show_default=False)
]


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")


def _url(database_url: str | None, data_dir: Path | None) -> str:
    """The database the service would use: flags, then CORRAL_* and CORRAL_CONFIG, then its defaults."""
    from scheduler.service.core.settings import ServiceSettings  # noqa: PLC0415

    given: dict[str, Any] = {"database_url": database_url, "data_dir": data_dir}
    try:
        settings = ServiceSettings(**{k: v for k, v in given.items() if v is not None})
    except (ValidationError, ValueError) as e:
        fail(f"bad settings: {e}", 2)
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings.url


def _where(url: str) -> str:
    import sqlalchemy as sa  # noqa: PLC0415

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _known(rev: str) -> str:
    from scheduler.service.store.db import revisions  # noqa: PLC0415

    if rev not in ("head", "base") and rev not in revisions():
        fail(f"unknown revision {rev!r}; this version knows {', '.join(revisions())} (and head, base)", 2)
    return rev


@db_app.command("current")
def current(database_url: DatabaseUrl = None, data_dir: DataDir = None) -> None:
    """Print the database's revision, and whether it is this version's newest (head)."""
    from scheduler.service.store.db import current_revision, head_revision  # noqa: PLC0415

    url = _url(database_url, data_dir)
    rev, head = current_revision(url), head_revision()
    state = "head" if rev == head else ("empty: no Corral schema" if rev is None else f"behind head {head}")
    typer.echo(f"{rev or 'none'} ({state})")


@db_app.command("upgrade")
def upgrade(
    to: Annotated[str, typer.Option("--to", help="Revision to reach (default: head, the newest).")] = "head",
    database_url: DatabaseUrl = None,
    data_dir: DataDir = None,
) -> None:
    """Migrate the database up (creating the schema on an empty one). Safe to run again: at head it does nothing."""
    from scheduler.service.store.db import current_revision, upgrade  # noqa: PLC0415

    url = _url(database_url, data_dir)
    before, to = current_revision(url), _known(to)
    try:
        upgrade(url, to)
    except Exception as e:  # an Alembic or database error: one line, not a traceback
        fail(f"upgrade of {_where(url)} from {before or 'empty'} to {to} failed: {e.__class__.__name__}: {e}")
    after = current_revision(url)
    note(f"{_where(url)}: {before or 'empty'} -> {after}" if before != after else f"{_where(url)}: already at {after}")


@db_app.command("downgrade")
def downgrade(
    to: Annotated[
        str,
        typer.Option("--to", help="Revision to go back to (see `corral db history`); required.", show_default=False),
    ],
    database_url: DatabaseUrl = None,
    data_dir: DataDir = None,
) -> None:
    """Migrate the database down to an older revision, before running an older Corral on it.

    What each step loses is in docs/kubernetes.md ("Upgrades"); stop the service first.
    """
    from scheduler.service.store.db import current_revision, downgrade  # noqa: PLC0415

    url = _url(database_url, data_dir)
    before = current_revision(url)
    if before is None:
        fail(f"{_where(url)} has no Corral schema: nothing to downgrade")
    to = _known(to)
    try:
        downgrade(url, to)
    except Exception as e:
        fail(f"downgrade of {_where(url)} from {before} to {to} failed: {e.__class__.__name__}: {e}")
    note(f"{_where(url)}: {before} -> {current_revision(url) or 'empty'}")


@db_app.command("history")
def history() -> None:
    """The migrations this version ships, oldest first (the newest is head)."""
    from scheduler.service.store.db import revisions  # noqa: PLC0415

    for rev in revisions():
        typer.echo(rev)
