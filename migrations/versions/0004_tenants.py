"""tenants, API keys, per-tenant expiring idempotency keys; jobs gain tenant, priority, paid_submissions

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("webhook_secret", sa.Text(), nullable=False),
        sa.Column("weight", sa.Integer(), server_default="1", nullable=False),
        sa.Column("rate_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_in_flight", sa.Integer(), nullable=True),
        sa.Column("daily_budget", sa.Integer(), nullable=True),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenants")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name=op.f("fk_api_keys_tenant_tenants"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant"), ["tenant"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant", sa.String(length=64), server_default="default", nullable=False))
        batch_op.add_column(sa.Column("priority", sa.String(length=8), server_default="normal", nullable=False))
        batch_op.add_column(sa.Column("paid_submissions", sa.Integer(), server_default="0", nullable=False))
        batch_op.drop_constraint("uq_jobs_idempotency_key", type_="unique")
        batch_op.create_index("ix_jobs_tenant_created_at", ["tenant", "created_at"], unique=False)

    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_idempotency_keys_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant", "key", name="pk_idempotency_keys"),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idempotency_keys_job_id"), ["job_id"], unique=False)

    # Jobs already paid at least once (they have a prediction) count one paid submission.
    op.execute("UPDATE jobs SET paid_submissions = 1 WHERE prediction_id IS NOT NULL")
    # Existing keys keep answering their job (tenant `default`, no fingerprint) for a day.
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, idempotency_key, created_at FROM jobs WHERE idempotency_key IS NOT NULL")).all()
    if rows:
        from models import UTCDateTime  # the same storage rules as the ORM (naive UTC on SQLite)

        keys = sa.table(
            "idempotency_keys",
            sa.column("tenant", sa.String()),
            sa.column("key", sa.String()),
            sa.column("job_id", sa.String()),
            sa.column("fingerprint", sa.String()),
            sa.column("expires_at", UTCDateTime()),
        )
        op.bulk_insert(
            keys,
            [
                {"tenant": "default", "key": key, "job_id": job_id, "fingerprint": None, "expires_at": _utc(at) + timedelta(days=1)}
                for job_id, key, at in rows
            ],
        )


def _utc(value) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_job_id"))
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_tenant_created_at")
        batch_op.create_unique_constraint("uq_jobs_idempotency_key", ["idempotency_key"])
        batch_op.drop_column("paid_submissions")
        batch_op.drop_column("priority")
        batch_op.drop_column("tenant")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant"))
    op.drop_table("api_keys")
    op.drop_table("tenants")
