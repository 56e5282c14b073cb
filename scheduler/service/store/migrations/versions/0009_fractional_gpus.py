"""GPUs as decimals (issue 27, GPU sharing): jobs.gpus and attempts.gpus hold a share of one GPU (0.25) or a MIG
slice's fraction (0.142857), so usage and GPU-hours count them exactly. Whole amounts keep their values.

Downgrading rounds a share up to 1 GPU (the previous schema's smallest amount): the older version then counts a
shared job as a whole GPU, never less than it held."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "attempts"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("gpus", existing_type=sa.Integer, type_=sa.Float, existing_nullable=False)


def downgrade() -> None:
    for table in ("jobs", "attempts"):
        op.execute(f"UPDATE {table} SET gpus = 1 WHERE gpus > 0 AND gpus < 1")
        op.execute(f"UPDATE {table} SET gpus = ROUND(gpus + 0.4999995) WHERE gpus <> ROUND(gpus)")
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                "gpus",
                existing_type=sa.Float,
                type_=sa.Integer,
                existing_nullable=False,
                postgresql_using="gpus::integer",
            )
