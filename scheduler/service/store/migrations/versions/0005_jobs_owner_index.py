"""An index on jobs (owner, id): a user's own jobs newest first without sorting all of them."""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_id", "jobs", ["owner", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_id", table_name="jobs")
