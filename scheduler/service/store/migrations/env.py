"""Alembic environment: runs Corral's migrations against the URL the service was configured with."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from scheduler.service.store.db import metadata

url = context.config.get_main_option("sqlalchemy.url")
assert url is not None
if context.is_offline_mode():
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    with create_engine(url).connect() as conn:
        # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
