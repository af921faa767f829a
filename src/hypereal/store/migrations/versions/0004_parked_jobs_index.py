"""a partial index of the parked jobs (queued, not sent to a worker) by model and age

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 09:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARKED = "state = 'queued' AND kicked_at IS NULL"


def upgrade() -> None:
    op.create_index(
        "ix_jobs_parked",
        "jobs",
        ["model", "created_at", "id"],
        unique=False,
        sqlite_where=sa.text(PARKED),
        postgresql_where=sa.text(PARKED),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_parked", table_name="jobs")
