"""jobs: (created_at, id) indexes for keyset pagination of GET /jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 18:45:00.000000
"""
from __future__ import annotations

from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_created_at_id', ['created_at', 'id'], unique=False)
        batch_op.create_index('ix_jobs_state_created_at_id', ['state', 'created_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_created_at_id')
        batch_op.drop_index('ix_jobs_created_at_id')
