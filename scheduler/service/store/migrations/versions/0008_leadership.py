"""One row saying which instance leads, since when and where it answers: the fencing token of high availability.

`epoch` grows by one each time an instance takes the lead (holding PostgreSQL's advisory lock); every decision
transaction of the leader reads it FOR SHARE and stops if it is no longer its own (scheduler/service/core/leader.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leadership",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("url", sa.String(500), nullable=True),
        sa.Column("since", sa.Float, nullable=False),
    )
    op.execute("INSERT INTO leadership (id, epoch, holder, url, since) VALUES (1, 0, '', NULL, 0)")


def downgrade() -> None:
    op.drop_table("leadership")
