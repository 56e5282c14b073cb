"""The Alembic migrations build exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from scheduler.service.store.db import connect, metadata, migrate


def test_migrations_match_the_tables(db_url: str) -> None:
    migrate(db_url)
    migrate(db_url)  # a second run is a no-op
    engine = connect(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []
