"""A partial index for the submitter's fair-share pick at a large backlog: jobs (tenant, priority,
created_at) WHERE state = 'queued'

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-03 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

QUEUED = sa.text("state = 'queued'")


def upgrade() -> None:
    op.create_index(
        "ix_jobs_queued_tenant_priority_created_at",
        "jobs",
        ["tenant", "priority", "created_at"],
        unique=False,
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_queued_tenant_priority_created_at", table_name="jobs")
