"""SQLAlchemy 2.0 typed models: Job, JobEvent, Outbox, Tenant, ApiKey, IdempotencyKey — one metadata,
no logic beyond column types.

The database is the source of truth for every job; Celery messages only say "look at job X".
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, MetaData, PrimaryKeyConstraint, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so Alembic revisions (and SQLite batch migrations) can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC in Python on every backend (SQLite hands back naive datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# BIGINT autoincrement on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    size: Mapped[str] = mapped_column(String(16))
    seed: Mapped[int] = mapped_column(BigInteger)
    # What the producer gave (a URL, or "file:<name>" for a local file) — for display and audit.
    image_ref: Mapped[str] = mapped_column(Text)
    # Where the input image is: `s3://bucket/{prefix}/inputs/{job_id}` (stored at admission), or the
    # public http(s) URL the provider fetches itself. NULL only on rows from before revision 0003.
    image_uri: Mapped[str | None] = mapped_column(Text)
    # sha256 (hex) of the input bytes stored in S3; NULL for a URL input (its bytes are never fetched here).
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    # Before revision 0003: the image as the provider receives it (a URL or a data: URI with base64).
    # New rows leave it NULL; submit reads it only for an old row without `image_uri`.
    image_payload: Mapped[str | None] = mapped_column(Text, deferred=True)
    enable_base64_output: Mapped[bool] = mapped_column(Boolean, default=False)
    # Which tenant owns the job (every read, list and action is scoped to it); `default` without keys.
    tenant: Mapped[str] = mapped_column(String(64), default="default", server_default="default")
    # high | normal | low: the submitter's order within a tenant (tenants themselves take turns).
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    # The producer's idempotency key, for display; uniqueness (per tenant, expiring) is IdempotencyKey's.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # How many provider submissions this job was billed for (cost = paid_submissions × cost setting).
    paid_submissions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Unique: one provider task can never be claimed by two jobs (the reconciler relies on it).
    prediction_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # What the provider returned (URLs or bare base64), kept until copied into S3.
    provider_outputs: Mapped[list[Any] | None] = mapped_column(JSON, deferred=True)
    outputs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    has_nsfw_contents: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # Polling: a poll message is valid only while its poll_seq matches the row's (stale chains die).
    poll_seq: Mapped[int] = mapped_column(Integer, default=0)
    next_poll_at: Mapped[datetime | None] = mapped_column()
    # When a deferred step (backoff, rate limit, open breaker) is due again.
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    submitted_at: Mapped[datetime | None] = mapped_column()
    deadline_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Where to POST the job (signed) when it reaches a terminal state; None: no callback.
    callback_url: Mapped[str | None] = mapped_column(Text)
    # The W3C traceparent of the job's admission span (revision 0006): every worker process that
    # takes a step of this job continues that trace. None: admitted with tracing off.
    trace_parent: Mapped[str | None] = mapped_column(String(55))

    __table_args__ = (
        Index("ix_jobs_state_updated_at", "state", "updated_at"),
        Index("ix_jobs_state_next_poll_at", "state", "next_poll_at"),
        Index("ix_jobs_tenant_created_at", "tenant", "created_at"),
        # Retention (`edit-worker prune`) finds finished jobs by when they finished.
        Index("ix_jobs_finished_at", "finished_at"),
        # Keyset pagination of `GET /jobs` (newest first), with and without a state filter.
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_state_created_at_id", "state", "created_at", "id"),
        # The submitter's fair-share pick at a large backlog: which tenants have queued jobs (a
        # skip scan over the leading column) and each tenant's oldest queued jobs of one
        # priority, read in index order and stopped at the LIMIT. Partial: only queued rows.
        Index(
            "ix_jobs_queued_tenant_priority_created_at",
            "tenant",
            "priority",
            "created_at",
            postgresql_where=text("state = 'queued'"),
            sqlite_where=text("state = 'queued'"),
        ),
    )

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state}>"


class JobEvent(Base):
    """One row per state change (the audit trail; failed jobs keep their whole history)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column()


class Outbox(Base):
    """Messages to publish, written in the same transaction as the job row they are about."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column()
    sent_at: Mapped[datetime | None] = mapped_column(index=True)


class Tenant(Base):
    """A team or product feature using the service: its jobs, keys, quotas and callback secret."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Signs this tenant's completion callbacks (Standard Webhooks `whsec_<base64>`); shown once at
    # `keys create`. Stored as is: it must sign, so it cannot be a hash.
    webhook_secret: Mapped[str] = mapped_column(Text)
    # The tenant's share of the submitter's turns (round-robin weight).
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Quotas; None = the deployment's default (EDIT_WORKER_TENANT_*), 0 = no limit.
    rate_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    daily_budget: Mapped[int | None] = mapped_column(Integer)
    # Where this tenant's job callbacks go when a job names none (None: no callback).
    callback_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # the public part, shown by `keys list`
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class IdempotencyKey(Base):
    """An idempotency key, unique per tenant until it expires, with the fingerprint of the request
    that used it: the same request again answers the same job, a different one is refused."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    fingerprint: Mapped[str | None] = mapped_column(String(64))  # None: a key from before fingerprints
    expires_at: Mapped[datetime] = mapped_column()

    __table_args__ = (PrimaryKeyConstraint("tenant", "key", name="pk_idempotency_keys"),)


class CallbackDelivery(Base):
    """One signed callback to a producer: written in the transaction that moved its job to a
    terminal state, then delivered (and retried with backoff) by engine/callbacks.py."""

    __tablename__ = "callback_deliveries"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # The terminal state this delivery announces (the event).
    state: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    # The Standard Webhooks message id: the same on every try and redelivery (receivers dedupe on it).
    webhook_id: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next try is due (pending), or the claim's lease runs out (being tried).
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    # Retries stop here (None: created_at + the configured retry window); a redelivery moves it.
    give_up_at: Mapped[datetime | None] = mapped_column()
    # The body sent: the job JSON as of the first try, so every try signs the same bytes.
    payload: Mapped[str | None] = mapped_column(Text, deferred=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column()
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    delivered_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (Index("ix_callback_deliveries_status_next_attempt_at", "status", "next_attempt_at"),)

    def __repr__(self) -> str:
        return f"<CallbackDelivery {self.id} job={self.job_id} {self.state} {self.status}>"


__all__ = ["ApiKey", "Base", "CallbackDelivery", "IdempotencyKey", "Job", "JobEvent", "Outbox", "Tenant", "UTCDateTime"]
