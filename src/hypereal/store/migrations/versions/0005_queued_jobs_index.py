"""the partial index of waiting jobs covers every queued job (a job whose model is busy is no
longer marked parked: the next of its model's jobs to end takes the oldest queued one)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = "state = 'queued'"
PARKED = "state = 'queued' AND kicked_at IS NULL"
COLUMNS = ["model", "created_at", "id"]


def _partial_index(name: str, where: str) -> None:
    op.create_index(
        name,
        "jobs",
        COLUMNS,
        unique=False,
        sqlite_where=sa.text(where),
        postgresql_where=sa.text(where),
    )


def upgrade() -> None:
    op.drop_index("ix_jobs_parked", table_name="jobs")
    _partial_index("ix_jobs_queued", QUEUED)


def downgrade() -> None:
    op.drop_index("ix_jobs_queued", table_name="jobs")
    _partial_index("ix_jobs_parked", PARKED)
