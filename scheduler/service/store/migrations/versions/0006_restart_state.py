"""What a rebuilt engine needs to decide as before a restart: each job's starvation-guard clock (jobs.overtaken_at)
and the order attempts were admitted in (attempts.admission)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("overtaken_at", sa.Float, nullable=True))
    # Attempts admitted before this migration keep NULL: they are restored first, by admission time.
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("admission", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("admission")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("overtaken_at")
