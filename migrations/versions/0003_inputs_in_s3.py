"""inputs in S3: jobs.image_uri and jobs.image_sha256; image_payload nullable; finished_at index

New jobs keep their input image in object storage (`s3://…/inputs/{job_id}`) or as the public URL
the provider fetches, and leave image_payload NULL. Existing rows keep their payload as it is:
submit reads it when a row has no image_uri.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 18:50:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('image_uri', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('image_sha256', sa.String(length=64), nullable=True))
        batch_op.alter_column('image_payload', existing_type=sa.Text(), nullable=True)
        batch_op.create_index('ix_jobs_finished_at', ['finished_at'], unique=False)


def downgrade() -> None:
    # The old schema needs a payload on every row: a URL input gets its URL back; an input stored in
    # S3 gets its s3:// URI, which the old code cannot submit (re-create such unfinished jobs).
    op.execute("UPDATE jobs SET image_payload = image_uri WHERE image_payload IS NULL AND image_uri IS NOT NULL")
    op.execute("UPDATE jobs SET image_payload = '' WHERE image_payload IS NULL")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_finished_at')
        batch_op.alter_column('image_payload', existing_type=sa.Text(), nullable=False)
        batch_op.drop_column('image_sha256')
        batch_op.drop_column('image_uri')
