"""Every setting the worker reads, in one typed object built from the environment.

Names of the contract (DESIGN §4) are read as-is; tuning knobs carry an `EDIT_WORKER_` prefix.
Secrets are `SecretStr`, so a repr, a log line or an error message never shows them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    # env_ignore_empty: `S3_ENDPOINT_URL=` in a .env means "unset" (AWS), not an empty endpoint.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    # --- the contract (DESIGN §4) ---
    wavespeed_api_key: SecretStr | None = Field(default=None, validation_alias=_env("WAVESPEED_API_KEY"))
    wavespeed_base_url: str = Field(default="https://api.wavespeed.ai", validation_alias=_env("WAVESPEED_BASE_URL"))
    database_url: str = Field(default="sqlite:///edit-worker.db", validation_alias=_env("DATABASE_URL"))
    celery_broker_url: str = Field(default="redis://localhost:6379/0", validation_alias=_env("CELERY_BROKER_URL"))
    s3_endpoint_url: str | None = Field(default=None, validation_alias=_env("S3_ENDPOINT_URL"))
    s3_bucket: str = Field(default="edit-worker", validation_alias=_env("S3_BUCKET"))
    s3_prefix: str = Field(default="edits", validation_alias=_env("S3_PREFIX"))
    aws_access_key_id: str | None = Field(default=None, validation_alias=_env("AWS_ACCESS_KEY_ID"))
    aws_secret_access_key: SecretStr | None = Field(default=None, validation_alias=_env("AWS_SECRET_ACCESS_KEY"))
    aws_region: str = Field(default="us-east-1", validation_alias=_env("AWS_REGION"))

    # Webhooks: the secret that signs WaveSpeed's calls to `POST /webhooks/wavespeed` (edit-worker
    # api), and the public URL of that endpoint to pass on submit. Polling stays on either way.
    webhook_secret: SecretStr | None = Field(default=None, validation_alias=_env("WAVESPEED_WEBHOOK_SECRET"))
    webhook_url: str | None = Field(default=None, validation_alias=_env("EDIT_WORKER_WEBHOOK_URL"))

    # --- tuning (EDIT_WORKER_*) ---
    # Redis for the shared limiter and circuit breaker; defaults to the broker's Redis.
    redis_url: str | None = Field(default=None, validation_alias=_env("EDIT_WORKER_REDIS_URL"))
    # Provider account tier: submissions per minute and tasks running at once (lowest tier: 2 and 2).
    rate_limit_per_minute: int = Field(default=120, ge=1, validation_alias=_env("EDIT_WORKER_RATE_LIMIT_PER_MINUTE"))
    max_concurrency: int = Field(default=100, ge=1, validation_alias=_env("EDIT_WORKER_MAX_CONCURRENCY"))
    # Pacing: at most this many submissions per second fleet-wide, smoothly (a token bucket; the
    # per-minute rate above allows a whole minute's quota at once). Set it to what the fleet can
    # copy out per second to keep a large burst's lag behind the provider low. 0 = off.
    submit_pace_per_second: float = Field(default=0.0, ge=0, validation_alias=_env("EDIT_WORKER_SUBMIT_PACE_PER_SECOND"))
    # How long a job may take in total before it is failed as hopeless.
    job_deadline_seconds: float = Field(default=3600.0, gt=0, validation_alias=_env("EDIT_WORKER_JOB_DEADLINE_SECONDS"))
    # First poll after submit (near the model's typical inference time; with adaptive_first_poll
    # only until that is learned), then every poll_interval (+ jitter).
    first_poll_delay: float = Field(default=3.0, ge=0, validation_alias=_env("EDIT_WORKER_FIRST_POLL_DELAY"))
    poll_interval: float = Field(default=2.0, ge=2.0, validation_alias=_env("EDIT_WORKER_POLL_INTERVAL"))
    poll_jitter: float = Field(default=0.5, ge=0, validation_alias=_env("EDIT_WORKER_POLL_JITTER"))
    # How jobs in `processing` are polled. "batch": a poller task claims due jobs by next_poll_at
    # (FOR UPDATE SKIP LOCKED) and polls them concurrently over the process's one HTTP client —
    # no message per poll, thousands in flight per worker. "task": each job chains its own poll
    # message with a countdown. Both are non-blocking; bench/RESULTS.md compares them.
    poll_mode: Literal["batch", "task"] = Field(default="batch", validation_alias=_env("EDIT_WORKER_POLL_MODE"))
    poll_batch_size: int = Field(default=100, ge=1, validation_alias=_env("EDIT_WORKER_POLL_BATCH_SIZE"))
    poll_threads: int = Field(default=32, ge=1, validation_alias=_env("EDIT_WORKER_POLL_THREADS"))
    # A claimed job's next_poll_at moves this far ahead: if its poller dies mid-batch the job is due
    # again after the lease and another poller takes it (none forgotten, none polled twice at once).
    poll_lease_seconds: float = Field(default=30.0, gt=0, validation_alias=_env("EDIT_WORKER_POLL_LEASE_SECONDS"))
    # Learn the model's typical inference time (what the provider reports, shared through Redis)
    # and poll a new prediction first at it (capped here); first_poll_delay is the guess used
    # until something has been learned.
    adaptive_first_poll: bool = Field(default=True, validation_alias=_env("EDIT_WORKER_ADAPTIVE_FIRST_POLL"))
    first_poll_max: float = Field(default=120.0, ge=0, validation_alias=_env("EDIT_WORKER_FIRST_POLL_MAX"))
    # Batch mode's poller copies a finished job's outputs to S3 itself (same threads, no upload
    # message); off: an upload task per finished job, as in task mode.
    upload_inline: bool = Field(default=True, validation_alias=_env("EDIT_WORKER_UPLOAD_INLINE"))
    # How queued jobs are submitted. "batch": a submitter task per worker node leases due queued
    # jobs (FOR UPDATE SKIP LOCKED), takes their limiter slots in one Redis call and submits them
    # over the process's one HTTP client; producers publish one wake-up per batch, not one message
    # per job. "task": one submit message per job.
    # A submit in the air when its process is SIGKILLed is ambiguous (the provider may have made
    # the task; its task list cannot say whose it is). One submit thread per pass keeps that to
    # one job per killed process, which the reconciler settles by itself; more threads submit
    # faster against a slow provider but can leave several for an operator (README, Reliability).
    submit_mode: Literal["batch", "task"] = Field(default="batch", validation_alias=_env("EDIT_WORKER_SUBMIT_MODE"))
    submit_batch_size: int = Field(default=100, ge=1, validation_alias=_env("EDIT_WORKER_SUBMIT_BATCH_SIZE"))
    submit_threads: int = Field(default=1, ge=1, validation_alias=_env("EDIT_WORKER_SUBMIT_THREADS"))
    # Submitter passes that may run at once on one worker node (each its own process and slot).
    submit_passes_per_node: int = Field(default=1, ge=1, validation_alias=_env("EDIT_WORKER_SUBMIT_PASSES_PER_NODE"))
    # Reap before sowing: while jobs due for polling wait longer than this (the pollers are behind,
    # e.g. the host's CPU is saturated), the submitter starts no new predictions, so finished
    # ones are copied out first and their lag stays bounded. 0 turns it off.
    submit_backpressure_seconds: float = Field(default=1.0, ge=0, validation_alias=_env("EDIT_WORKER_SUBMIT_BACKPRESSURE_SECONDS"))
    # A leased queued job is due again after this long if its submitter died before sending it.
    submit_lease_seconds: float = Field(default=30.0, gt=0, validation_alias=_env("EDIT_WORKER_SUBMIT_LEASE_SECONDS"))
    # Poller passes that may run at once on one worker node (each in its own Celery slot and
    # process, so polling and copying outputs can use more than one core); the submitter runs one.
    poll_passes_per_node: int = Field(default=2, ge=1, validation_alias=_env("EDIT_WORKER_POLL_PASSES_PER_NODE"))
    # How long one submitter or poller pass runs before it hands its worker slot back (and wakes
    # itself again if work remains).
    batch_pass_seconds: float = Field(default=3.0, gt=0, validation_alias=_env("EDIT_WORKER_BATCH_PASS_SECONDS"))
    # Transient-error backoff (full jitter): base * 2**attempt capped at max.
    backoff_base: float = Field(default=2.0, gt=0, validation_alias=_env("EDIT_WORKER_BACKOFF_BASE"))
    backoff_max: float = Field(default=60.0, gt=0, validation_alias=_env("EDIT_WORKER_BACKOFF_MAX"))
    # A 401/403 opens the shared breaker for this long before one probe submission is let through.
    breaker_open_seconds: float = Field(default=60.0, gt=0, validation_alias=_env("EDIT_WORKER_BREAKER_OPEN_SECONDS"))
    # An outage opens the same breaker: this many transient provider failures (5xx, HTML pages,
    # connect errors, 429s) within the window, with no success between, pause the fleet's calls.
    outage_failure_threshold: int = Field(default=10, ge=1, validation_alias=_env("EDIT_WORKER_OUTAGE_FAILURE_THRESHOLD"))
    outage_failure_window: float = Field(default=30.0, gt=0, validation_alias=_env("EDIT_WORKER_OUTAGE_FAILURE_WINDOW"))
    outage_open_seconds: float = Field(default=10.0, gt=0, validation_alias=_env("EDIT_WORKER_OUTAGE_OPEN_SECONDS"))
    # Ambiguous-submit matching: allowed clock skew around the submit's time window, and how long
    # the provider's task list may lag a submit before "no task listed" counts as "none created".
    ambiguous_skew_seconds: float = Field(default=30.0, ge=0, validation_alias=_env("EDIT_WORKER_AMBIGUOUS_SKEW_SECONDS"))
    ambiguous_list_grace_seconds: float = Field(default=15.0, ge=0, validation_alias=_env("EDIT_WORKER_AMBIGUOUS_LIST_GRACE_SECONDS"))
    # HTTP timeouts towards the provider (seconds).
    http_connect_timeout: float = Field(default=10.0, gt=0, validation_alias=_env("EDIT_WORKER_HTTP_CONNECT_TIMEOUT"))
    http_timeout: float = Field(default=60.0, gt=0, validation_alias=_env("EDIT_WORKER_HTTP_TIMEOUT"))
    # A job whose row has not moved for this long (past its own schedule) is re-driven by the reconciler.
    stuck_after_seconds: float = Field(default=60.0, gt=0, validation_alias=_env("EDIT_WORKER_STUCK_AFTER_SECONDS"))
    # How often beat runs the reconciler (outbox relay + stuck-job sweep + ambiguous submits).
    sweep_interval: float = Field(default=5.0, gt=0, validation_alias=_env("EDIT_WORKER_SWEEP_INTERVAL"))
    # Input checks.
    max_image_bytes: int = Field(default=10 * 1024 * 1024, gt=0, validation_alias=_env("EDIT_WORKER_MAX_IMAGE_BYTES"))
    allow_private_urls: bool = Field(default=False, validation_alias=_env("EDIT_WORKER_ALLOW_PRIVATE_URLS"))
    # Ask the provider for base64 outputs instead of URLs.
    base64_output: bool = Field(default=False, validation_alias=_env("EDIT_WORKER_BASE64_OUTPUT"))

    # Callbacks to producers (a job's callback_url, POSTed on every terminal state, signed the
    # Standard Webhooks way). The signing secret, `whsec_<base64>` (engine/callbacks.callback_secret).
    callback_secret: SecretStr | None = Field(default=None, validation_alias=_env("EDIT_WORKER_CALLBACK_SECRET"))
    # Seconds one try may take in all (connect, send, answer): a slow receiver must not hold a slot.
    callback_timeout: float = Field(default=10.0, gt=0, validation_alias=_env("EDIT_WORKER_CALLBACK_TIMEOUT"))
    # Failed tries are retried with exponential backoff (base * 2**(try-1), capped, jittered to
    # half..full) for this long after the terminal state (or a redelivery); then `failed`.
    callback_retry_seconds: float = Field(default=86400.0, gt=0, validation_alias=_env("EDIT_WORKER_CALLBACK_RETRY_SECONDS"))
    callback_backoff_base: float = Field(default=5.0, gt=0, validation_alias=_env("EDIT_WORKER_CALLBACK_BACKOFF_BASE"))
    callback_backoff_max: float = Field(default=3600.0, gt=0, validation_alias=_env("EDIT_WORKER_CALLBACK_BACKOFF_MAX"))
    # Deliveries one pass claims at a time, and the threads it sends them with.
    callback_batch_size: int = Field(default=50, ge=1, validation_alias=_env("EDIT_WORKER_CALLBACK_BATCH_SIZE"))
    callback_threads: int = Field(default=16, ge=1, validation_alias=_env("EDIT_WORKER_CALLBACK_THREADS"))

    @property
    def limiter_redis_url(self) -> str:
        return self.redis_url or self.celery_broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings(...)` and pass it explicitly."""
    return Settings()


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings built from an explicit environment mapping (for a child process's env, in tests,
    benchmarks and the demo), ignoring this process's environment and any .env file."""
    names = {str(choice).lower() for info in Settings.model_fields.values() for choice in getattr(info.validation_alias, "choices", [])}
    return Settings(_env_file=None, **{k.lower(): v for k, v in env.items() if k.isupper() and k.lower() in names})
