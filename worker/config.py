"""Every setting the worker reads, in one typed object built from the environment.

Names of the contract (DESIGN §4) are read as-is; tuning knobs carry an `EDIT_WORKER_` prefix.
Secrets are `SecretStr`, so a repr, a log line or an error message never shows them.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


_SECRET_QUERY = re.compile(r"(?i)((?:^|[?&;])(?:password|passwd|pwd|secret|token|access_?key|secret_?key)=)[^&;#]*")


def redact_url(url: str) -> str:
    """`url` fit to show: a password in its userinfo or query replaced by `***`."""
    text = str.__str__(url)
    try:
        parts = urlsplit(text)
        has_password = parts.password is not None
    except ValueError:
        return "<unparsable url>"
    if has_password:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}")
    if parts.query:
        parts = parts._replace(query=_SECRET_QUERY.sub(r"\1***", parts.query))
    return parts.geturl() if (has_password or parts.query) else text


class DisplayURL(str):
    """A URL that is the real string to every consumer (SQLAlchemy, redis, Celery, f-strings) but
    shows no credentials in a repr: `repr(settings)`, `str(settings)` and `str(model_dump())`
    print field values with repr, so they stay free of passwords."""

    def __repr__(self) -> str:
        return repr(redact_url(self))


def _display(value: str | None) -> str | None:
    return None if value is None else DisplayURL(value)


URL = Annotated[str, AfterValidator(_display)]
OptionalURL = Annotated[str | None, AfterValidator(_display)]


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    # env_ignore_empty: `S3_ENDPOINT_URL=` in a .env means "unset" (AWS), not an empty endpoint.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True, env_ignore_empty=True, validate_default=True
    )

    # --- the contract (DESIGN §4) ---
    wavespeed_api_key: SecretStr | None = Field(
        default=None,
        description="WaveSpeed API key, sent as `Authorization: Bearer …`. A secret: never logged, stored or echoed. Unset: no key (the demo then uses the local sandbox).",
        validation_alias=_env("WAVESPEED_API_KEY"),
    )
    wavespeed_base_url: URL = Field(
        default="https://api.wavespeed.ai",
        description="The provider's base URL; point it at `edit-worker sandbox` for local work.",
        validation_alias=_env("WAVESPEED_BASE_URL"),
    )
    database_url: URL = Field(
        default="sqlite:///edit-worker.db",
        description="SQLAlchemy URL of the job database, the source of truth. PostgreSQL in production: `postgresql+psycopg://USER:PASSWORD@HOST:5432/DB`.",
        validation_alias=_env("DATABASE_URL"),
    )
    celery_broker_url: URL = Field(
        default="redis://localhost:6379/0",
        description="Celery broker (Redis). Also holds the shared limiter, breaker and journal unless `EDIT_WORKER_REDIS_URL` is set.",
        validation_alias=_env("CELERY_BROKER_URL"),
    )
    s3_endpoint_url: OptionalURL = Field(
        default=None,
        description="Endpoint of an S3-compatible server (MinIO, SeaweedFS, moto, rclone …). Unset: AWS S3.",
        validation_alias=_env("S3_ENDPOINT_URL"),
    )
    s3_bucket: str = Field(default="edit-worker", description="Bucket the outputs are copied to.", validation_alias=_env("S3_BUCKET"))
    s3_prefix: str = Field(
        default="edits",
        description="Key prefix: outputs land at `s3://$S3_BUCKET/$S3_PREFIX/{job_id}/{index}.{ext}`.",
        validation_alias=_env("S3_PREFIX"),
    )
    aws_access_key_id: str | None = Field(
        default=None,
        description="S3 access key id. Unset: boto3's usual credential chain (instance role, ~/.aws, …).",
        validation_alias=_env("AWS_ACCESS_KEY_ID"),
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None,
        description="S3 secret access key (a secret). Unset: boto3's usual credential chain.",
        validation_alias=_env("AWS_SECRET_ACCESS_KEY"),
    )
    aws_region: str = Field(default="us-east-1", description="S3 region.", validation_alias=_env("AWS_REGION"))

    # Webhooks: the secret that signs WaveSpeed's calls to `POST /webhooks/wavespeed` (edit-worker
    # api), and the public URL of that endpoint to pass on submit. Polling stays on either way.
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Secret (`whsec_…`) that verifies the provider's webhook calls to `POST /webhooks/wavespeed` of `edit-worker api`. Unset: the webhook endpoint is off.",
        validation_alias=_env("WAVESPEED_WEBHOOK_SECRET"),
    )
    webhook_url: OptionalURL = Field(
        default=None,
        description="Public URL of `edit-worker api`'s `POST /webhooks/wavespeed`. With `WAVESPEED_WEBHOOK_SECRET` set, every submit carries its job's signed webhook URL: completions arrive at once and ambiguous submits are settled with certainty. Polling stays on either way.",
        validation_alias=_env("EDIT_WORKER_WEBHOOK_URL"),
    )

    # --- tuning (EDIT_WORKER_*) ---
    # Redis for the shared limiter and circuit breaker; defaults to the broker's Redis.
    redis_url: OptionalURL = Field(
        default=None,
        description="Redis for the shared limiter, circuit breaker and submit journal. Unset: the broker's Redis (`CELERY_BROKER_URL`).",
        validation_alias=_env("EDIT_WORKER_REDIS_URL"),
    )
    # Provider account tier: submissions per minute and tasks running at once (lowest tier: 2 and 2).
    rate_limit_per_minute: int = Field(
        default=120,
        ge=1,
        description="Provider submissions per minute, fleet-wide (your account tier; the lowest is 2).",
        validation_alias=_env("EDIT_WORKER_RATE_LIMIT_PER_MINUTE"),
    )
    max_concurrency: int = Field(
        default=100,
        ge=1,
        description="Provider tasks in flight at once, fleet-wide (your account tier; the lowest is 2).",
        validation_alias=_env("EDIT_WORKER_MAX_CONCURRENCY"),
    )
    # Pacing: at most this many submissions per second fleet-wide, smoothly (a token bucket; the
    # per-minute rate above allows a whole minute's quota at once). Set it to what the fleet can
    # copy out per second to keep a large burst's lag behind the provider low. 0 = off.
    submit_pace_per_second: float = Field(
        default=0.0,
        ge=0,
        description="At most this many submissions per second fleet-wide, evenly (a token bucket): a manual override of `EDIT_WORKER_ADAPTIVE_PACING`. 0: off (adaptive pacing decides).",
        validation_alias=_env("EDIT_WORKER_SUBMIT_PACE_PER_SECOND"),
    )
    # Adaptive pacing: with no manual pace, submissions go out at what the fleet has lately copied
    # out per second (its busiest second in the last minute) times a headroom that probes upward
    # while the pollers keep up — so a large burst is not submitted faster than its results can be
    # copied when they come back (the lag behind the provider stays low). Never below a floor.
    adaptive_pacing: bool = Field(
        default=True,
        description="Pace submissions by the fleet's measured copy-out rate (jobs copied to S3 per second, fleet-wide) so a large burst's results are copied as they finish. `EDIT_WORKER_SUBMIT_PACE_PER_SECOND` > 0 overrides it.",
        validation_alias=_env("EDIT_WORKER_ADAPTIVE_PACING"),
    )
    adaptive_pace_floor: float = Field(
        default=20.0,
        gt=0,
        description="Adaptive pacing never paces below this many submissions per second fleet-wide (also the rate before anything has been copied).",
        validation_alias=_env("EDIT_WORKER_ADAPTIVE_PACE_FLOOR"),
    )
    # How long a job may take in total before it is failed as hopeless.
    job_deadline_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds a job may take in total (counted from its creation, or from its last retry) before it fails as hopeless (`deadline_exceeded`).",
        validation_alias=_env("EDIT_WORKER_JOB_DEADLINE_SECONDS"),
    )
    # First poll after submit (near the model's typical inference time; with adaptive_first_poll
    # only until that is learned), then every poll_interval (+ jitter).
    first_poll_delay: float = Field(
        default=3.0,
        ge=0,
        description="Seconds from submit to the first poll: a guess of the model's inference time, used until the worker has learned it (`EDIT_WORKER_ADAPTIVE_FIRST_POLL`).",
        validation_alias=_env("EDIT_WORKER_FIRST_POLL_DELAY"),
    )
    poll_interval: float = Field(
        default=2.0,
        ge=2.0,
        description="Seconds between polls after the first (at least 2, the provider's guidance for images).",
        validation_alias=_env("EDIT_WORKER_POLL_INTERVAL"),
    )
    poll_jitter: float = Field(
        default=0.5,
        ge=0,
        description="Up to this many random seconds added to each poll interval, so the polls of many jobs stay apart.",
        validation_alias=_env("EDIT_WORKER_POLL_JITTER"),
    )
    # How jobs in `processing` are polled. "batch": a poller task claims due jobs by next_poll_at
    # (FOR UPDATE SKIP LOCKED) and polls them concurrently over the process's one HTTP client —
    # no message per poll, thousands in flight per worker. "task": each job chains its own poll
    # message with a countdown. Both are non-blocking; bench/RESULTS.md compares them.
    poll_mode: Literal["batch", "task"] = Field(
        default="batch",
        description="`batch`: a poller pass claims due jobs and polls them concurrently (no message per poll). `task`: every job chains its own poll message.",
        validation_alias=_env("EDIT_WORKER_POLL_MODE"),
    )
    poll_batch_size: int = Field(
        default=100, ge=1, description="Jobs one poller pass claims at a time.", validation_alias=_env("EDIT_WORKER_POLL_BATCH_SIZE")
    )
    poll_threads: int = Field(
        default=32,
        ge=1,
        description="Threads a poller process polls (and copies outputs) with.",
        validation_alias=_env("EDIT_WORKER_POLL_THREADS"),
    )
    # A claimed job's next_poll_at moves this far ahead: if its poller dies mid-batch the job is due
    # again after the lease and another poller takes it (none forgotten, none polled twice at once).
    poll_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A poller's claim on a job lasts this long: if the poller dies, another polls the job after it.",
        validation_alias=_env("EDIT_WORKER_POLL_LEASE_SECONDS"),
    )
    # Learn the model's typical inference time (what the provider reports, shared through Redis)
    # and poll a new prediction first at it (capped here); first_poll_delay is the guess used
    # until something has been learned.
    adaptive_first_poll: bool = Field(
        default=True,
        description="Learn the model's typical inference time from the provider's reports (fleet-wide, in Redis) and poll a new prediction first at it.",
        validation_alias=_env("EDIT_WORKER_ADAPTIVE_FIRST_POLL"),
    )
    first_poll_max: float = Field(
        default=120.0,
        ge=0,
        description="With adaptive first polls: never poll first later than this many seconds after the submit.",
        validation_alias=_env("EDIT_WORKER_FIRST_POLL_MAX"),
    )
    # Batch mode's poller copies a finished job's outputs to S3 itself (same threads, no upload
    # message); off: an upload task per finished job, as in task mode.
    upload_inline: bool = Field(
        default=True,
        description="In batch poll mode the poller copies a finished job's outputs to S3 itself. Off: an upload message per finished job.",
        validation_alias=_env("EDIT_WORKER_UPLOAD_INLINE"),
    )
    # How queued jobs are submitted. "batch": a submitter task per worker node leases due queued
    # jobs (FOR UPDATE SKIP LOCKED), takes their limiter slots in one Redis call and submits them
    # over the process's one HTTP client; producers publish one wake-up per batch, not one message
    # per job. "task": one submit message per job.
    # A submit in the air when its process is SIGKILLed is ambiguous (the provider may have made
    # the task; its task list cannot say whose it is). One submit thread per pass keeps that to
    # one job per killed process, which the reconciler settles by itself; more threads submit
    # faster against a slow provider but can leave several for an operator (README, Reliability).
    submit_mode: Literal["batch", "task"] = Field(
        default="batch",
        description="`batch`: a submitter pass leases due queued jobs and submits them (one wake-up per batch, no message per job). `task`: one submit message per job.",
        validation_alias=_env("EDIT_WORKER_SUBMIT_MODE"),
    )
    submit_batch_size: int = Field(
        default=100,
        ge=1,
        description="Jobs a submitter pass leases at a time (fewer if they would not all go out within one pass).",
        validation_alias=_env("EDIT_WORKER_SUBMIT_BATCH_SIZE"),
    )
    submit_threads: int = Field(
        default=1,
        ge=1,
        description="Submits a submitter pass has in the air at once. 1 keeps a SIGKILLed submitter to one ambiguous submit, which the reconciler settles by itself; more can leave several for an operator.",
        validation_alias=_env("EDIT_WORKER_SUBMIT_THREADS"),
    )
    # Submitter passes that may run at once on one worker node (each its own process and slot).
    submit_passes_per_node: int = Field(
        default=1,
        ge=1,
        description="Submitter passes that may run at once on one worker node (each in its own Celery slot).",
        validation_alias=_env("EDIT_WORKER_SUBMIT_PASSES_PER_NODE"),
    )
    # Reap before sowing: while jobs due for polling wait longer than this (the pollers are behind,
    # e.g. the host's CPU is saturated), the submitter starts no new predictions, so finished
    # ones are copied out first and their lag stays bounded. 0 turns it off.
    submit_backpressure_seconds: float = Field(
        default=1.0,
        ge=0,
        description="While polls are overdue by more than this many seconds (the pollers are behind), no new submissions start: finished predictions are copied out first. 0: off.",
        validation_alias=_env("EDIT_WORKER_SUBMIT_BACKPRESSURE_SECONDS"),
    )
    # A leased queued job is due again after this long if its submitter died before sending it.
    submit_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A leased queued job is due again after this long if its submitter died before sending it.",
        validation_alias=_env("EDIT_WORKER_SUBMIT_LEASE_SECONDS"),
    )
    # Poller passes that may run at once on one worker node (each in its own Celery slot and
    # process, so polling and copying outputs can use more than one core); the submitter runs one.
    poll_passes_per_node: int = Field(
        default=2,
        ge=1,
        description="Poller passes that may run at once on one worker node (each in its own Celery slot and process).",
        validation_alias=_env("EDIT_WORKER_POLL_PASSES_PER_NODE"),
    )
    # How long one submitter or poller pass runs before it hands its worker slot back (and wakes
    # itself again if work remains).
    batch_pass_seconds: float = Field(
        default=3.0,
        gt=0,
        description="Seconds one submitter or poller pass runs before it hands its worker slot back (and wakes itself again if work remains).",
        validation_alias=_env("EDIT_WORKER_BATCH_PASS_SECONDS"),
    )
    # Transient-error backoff (full jitter): base * 2**attempt capped at max.
    backoff_base: float = Field(
        default=2.0,
        gt=0,
        description="Transient-error backoff with full jitter: `base * 2**attempt` seconds …",
        validation_alias=_env("EDIT_WORKER_BACKOFF_BASE"),
    )
    backoff_max: float = Field(
        default=60.0, gt=0, description="… capped at this many seconds.", validation_alias=_env("EDIT_WORKER_BACKOFF_MAX")
    )
    # A 401/403 opens the shared breaker for this long before one probe submission is let through.
    breaker_open_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a 401/403 keeps the shared circuit breaker open before one probe submission tests the key.",
        validation_alias=_env("EDIT_WORKER_BREAKER_OPEN_SECONDS"),
    )
    # An outage opens the same breaker: this many transient provider failures (5xx, HTML pages,
    # connect errors, 429s) within the window, with no success between, pause the fleet's calls.
    outage_failure_threshold: int = Field(
        default=10,
        ge=1,
        description="Transient provider failures (5xx, HTML pages, connect errors, 429s) within the window, with no success between, that open the breaker.",
        validation_alias=_env("EDIT_WORKER_OUTAGE_FAILURE_THRESHOLD"),
    )
    outage_failure_window: float = Field(
        default=30.0,
        gt=0,
        description="Window (seconds) over which those outage failures are counted.",
        validation_alias=_env("EDIT_WORKER_OUTAGE_FAILURE_WINDOW"),
    )
    outage_open_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Seconds an outage keeps the breaker open.",
        validation_alias=_env("EDIT_WORKER_OUTAGE_OPEN_SECONDS"),
    )
    # Ambiguous-submit matching: allowed clock skew around the submit's time window, and how long
    # the provider's task list may lag a submit before "no task listed" counts as "none created".
    ambiguous_skew_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Clock skew (seconds) allowed around an ambiguous submit's time window when matching it to a provider task.",
        validation_alias=_env("EDIT_WORKER_AMBIGUOUS_SKEW_SECONDS"),
    )
    ambiguous_list_grace_seconds: float = Field(
        default=15.0,
        ge=0,
        description='Seconds the provider\'s task list may lag a submit before "not listed" counts as "not created".',
        validation_alias=_env("EDIT_WORKER_AMBIGUOUS_LIST_GRACE_SECONDS"),
    )
    # HTTP timeouts towards the provider (seconds).
    http_connect_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to connect to the provider.", validation_alias=_env("EDIT_WORKER_HTTP_CONNECT_TIMEOUT")
    )
    http_timeout: float = Field(
        default=60.0, gt=0, description="Seconds for a whole provider request.", validation_alias=_env("EDIT_WORKER_HTTP_TIMEOUT")
    )
    # A job whose row has not moved for this long (past its own schedule) is re-driven by the reconciler.
    stuck_after_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a job's row may sit past its own schedule before the reconciler re-drives it.",
        validation_alias=_env("EDIT_WORKER_STUCK_AFTER_SECONDS"),
    )
    # How often beat runs the reconciler (outbox relay + stuck-job sweep + ambiguous submits).
    sweep_interval: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between reconciler runs in beat (outbox relay, stuck-job sweep, ambiguous submits).",
        validation_alias=_env("EDIT_WORKER_SWEEP_INTERVAL"),
    )
    # Input checks.
    max_image_bytes: int = Field(
        default=10 * 1024 * 1024,
        gt=0,
        description="Largest input image accepted, in bytes.",
        validation_alias=_env("EDIT_WORKER_MAX_IMAGE_BYTES"),
    )
    batch_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="The largest POST /jobs/batch body taken, in bytes (up to 1,000 jobs; images as base64 count here); a larger one is refused with 413 before it is read.",
        validation_alias=_env("EDIT_WORKER_BATCH_MAX_BYTES"),
    )
    allow_private_urls: bool = Field(
        default=False,
        description="Allow input image URLs and callback URLs that resolve to private, loopback or link-local addresses (turns their SSRF guard off; output downloads have their own rule: EDIT_WORKER_OUTPUT_HOSTS).",
        validation_alias=_env("EDIT_WORKER_ALLOW_PRIVATE_URLS"),
    )
    # How the provider gets an input image kept in S3: "base64" (read from S3 at submit time and
    # sent inline; works with a private S3) or "presigned_url" (a GET URL valid for
    # input_url_expiry_seconds, for deployments whose S3 the provider can reach).
    input_delivery: Literal["base64", "presigned_url"] = Field(
        default="base64",
        description="How the provider gets an input image kept in S3: base64 (read from S3 at submit time and sent inline) or presigned_url (for an S3 the provider can reach).",
        validation_alias=_env("EDIT_WORKER_INPUT_DELIVERY"),
    )
    # Tracing and logs (README "Tracing and logs"): off unless an OTLP endpoint is set, so an
    # unconfigured deployment never loads the OpenTelemetry SDK.
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP endpoint (base URL, e.g. http://collector:4318) to export one trace per job to; unset: tracing off and the OpenTelemetry SDK never loaded. The standard OTEL_EXPORTER_OTLP_ENDPOINT is honoured too.",
        validation_alias=AliasChoices(
            "EDIT_WORKER_OTLP_ENDPOINT", "edit_worker_otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", "otel_exporter_otlp_endpoint"
        ),
    )
    service_name: str = Field(
        default="edit-worker",
        min_length=1,
        max_length=128,
        description="The service.name of exported spans (each process adds its own service.instance.id and process.pid). The standard OTEL_SERVICE_NAME is honoured too.",
        validation_alias=AliasChoices("EDIT_WORKER_SERVICE_NAME", "edit_worker_service_name", "OTEL_SERVICE_NAME", "otel_service_name"),
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines as text (key=value context) or json (one object a line: time, level, logger, message and the job's job_id, tenant, prediction_id, trace_id).",
        validation_alias=_env("EDIT_WORKER_LOG_FORMAT"),
    )
    input_url_expiry_seconds: int = Field(
        default=3600,
        ge=60,
        le=7 * 24 * 3600,
        description="How long a presigned input URL given to the provider stays valid, in seconds.",
        validation_alias=_env("EDIT_WORKER_INPUT_URL_EXPIRY_SECONDS"),
    )
    allow_http_provider: bool = Field(
        default=False,
        description="Allow plain http:// to a provider that is not on this machine (the docker-compose sandbox). Off: the API key and every image would cross the network in clear text.",
        validation_alias=_env("EDIT_WORKER_ALLOW_HTTP_PROVIDER"),
    )
    webhook_max_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="The largest provider webhook body taken, in bytes; a larger one is refused with 413 and the job's poll reads the result instead.",
        validation_alias=_env("EDIT_WORKER_WEBHOOK_MAX_BYTES"),
    )
    metrics_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="`/metrics` counts jobs by state at most this often (seconds); scrapes in between share the counts.",
        validation_alias=_env("EDIT_WORKER_METRICS_CACHE_SECONDS"),
    )
    metrics_tenants: str = Field(
        default="",
        description="Tenants that get their own `tenant` label value in the job metrics, comma-separated; every other tenant is counted as `other` (keeps the label's values bounded).",
        validation_alias=_env("EDIT_WORKER_METRICS_TENANTS"),
    )
    metrics_flush_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Each worker process moves its metric counts to Redis (and says it is alive) this often, in seconds; `/metrics` lags by at most this much.",
        validation_alias=_env("EDIT_WORKER_METRICS_FLUSH_SECONDS"),
    )
    output_hosts: str = Field(
        default="",
        description="Output downloads: hosts trusted besides WAVESPEED_BASE_URL's host:port, comma-separated (`host` = its default http/https ports, `host:port` = that port). Every other hop, redirects included, must be a public address.",
        validation_alias=_env("EDIT_WORKER_OUTPUT_HOSTS"),
    )
    max_output_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="The largest output accepted (a download, or decoded base64), in bytes.",
        validation_alias=_env("EDIT_WORKER_MAX_OUTPUT_BYTES"),
    )
    download_timeout: float = Field(
        default=120.0,
        gt=0,
        description="The whole output download's time limit in seconds, redirects included (not only each read).",
        validation_alias=_env("EDIT_WORKER_DOWNLOAD_TIMEOUT"),
    )
    # Ask the provider for base64 outputs instead of URLs.
    base64_output: bool = Field(
        default=False,
        description="Ask the provider for base64 outputs instead of URLs.",
        validation_alias=_env("EDIT_WORKER_BASE64_OUTPUT"),
    )

    # --- tenants (`edit-worker keys`, the HTTP API's front door) ---
    # How long an idempotency key answers its job; after that the key may start a new job.
    idempotency_ttl_seconds: float = Field(
        description="How long an idempotency key answers its job (seconds); after that the key may start a new job.",
        default=86400.0,
        gt=0,
        validation_alias=_env("EDIT_WORKER_IDEMPOTENCY_TTL_SECONDS"),
    )
    # What one paid provider submission costs (your currency); shown as the job's and tenant's `cost`.
    cost_per_submission: float = Field(
        description="What one paid provider submission costs (your currency); shown as the job's and the tenant's cost.",
        default=0.0,
        ge=0,
        validation_alias=_env("EDIT_WORKER_COST_PER_SUBMISSION"),
    )
    # Per-tenant quotas (0 = no limit); a tenant's own values (`edit-worker tenants set`) win.
    # Over the rate or the daily budget an admission answers 429 with Retry-After; over the
    # in-flight share jobs wait in `queued` while the tenant's others run.
    tenant_rate_per_minute: int = Field(
        description="Default admissions per minute per tenant (0: no limit); over it an admission answers 429 with Retry-After.",
        default=0,
        ge=0,
        validation_alias=_env("EDIT_WORKER_TENANT_RATE_PER_MINUTE"),
    )
    tenant_max_in_flight: int = Field(
        description="Default jobs at the provider at once per tenant (0: no limit); a tenant's further jobs wait in queued.",
        default=0,
        ge=0,
        validation_alias=_env("EDIT_WORKER_TENANT_MAX_IN_FLIGHT"),
    )
    tenant_daily_budget: int = Field(
        description="Default paid jobs per tenant per UTC day (0: no limit); over it an admission answers 429 until midnight UTC.",
        default=0,
        ge=0,
        validation_alias=_env("EDIT_WORKER_TENANT_DAILY_BUDGET"),
    )
    # Result links: how long a presigned output URL in the job JSON stays valid (S3 allows 7 days at most).
    result_link_seconds: int = Field(
        description="How long a result link (a presigned output URL in the job JSON) stays valid, in seconds (at most 7 days).",
        default=86400,
        ge=60,
        le=604800,
        validation_alias=_env("EDIT_WORKER_RESULT_LINK_SECONDS"),
    )

    @model_validator(mode="after")
    def _provider_over_https(self) -> Settings:
        try:
            parts = urlsplit(self.wavespeed_base_url)
            host = parts.hostname
        except ValueError:
            raise ValueError(f"WAVESPEED_BASE_URL {redact_url(self.wavespeed_base_url)!r} is not a URL") from None
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError(f"WAVESPEED_BASE_URL {redact_url(self.wavespeed_base_url)!r} must be an http(s) URL with a host")
        if parts.scheme == "http" and not is_loopback_host(host) and not self.allow_http_provider:
            raise ValueError(
                f"WAVESPEED_BASE_URL must use https:// for a host that is not this machine (got http://{host}); "
                "plain http is for a local sandbox (127.0.0.1/localhost) or with EDIT_WORKER_ALLOW_HTTP_PROVIDER=true"
            )
        return self

    @property
    def metrics_tenant_set(self) -> frozenset[str]:
        """EDIT_WORKER_METRICS_TENANTS as a set."""
        return frozenset(t.strip() for t in self.metrics_tenants.split(",") if t.strip())

    @property
    def trusted_output_hosts(self) -> list[str]:
        """WAVESPEED_BASE_URL's origin, then EDIT_WORKER_OUTPUT_HOSTS, one entry each."""
        return [self.wavespeed_base_url, *(h.strip() for h in self.output_hosts.split(",") if h.strip())]

    # Callbacks to producers (a job's callback_url, POSTed on every terminal state, signed the
    # Standard Webhooks way). The signing secret, `whsec_<base64>` (engine/callbacks.callback_secret).
    callback_secret: SecretStr | None = Field(
        description="Signs completion callbacks (Standard Webhooks `whsec_<base64>`) for tenants without a secret of their own (`edit-worker keys create` gives each tenant one).",
        default=None,
        validation_alias=_env("EDIT_WORKER_CALLBACK_SECRET"),
    )
    # Seconds one try may take in all (connect, send, answer): a slow receiver must not hold a slot.
    callback_timeout: float = Field(
        description="Seconds one callback delivery try may take (connect included).",
        default=10.0,
        gt=0,
        validation_alias=_env("EDIT_WORKER_CALLBACK_TIMEOUT"),
    )
    # Failed tries are retried with exponential backoff (base * 2**(try-1), capped, jittered to
    # half..full) for this long after the terminal state (or a redelivery); then `failed`.
    callback_retry_seconds: float = Field(
        description="How long a failing callback delivery is retried (with exponential backoff) before it is marked failed; `callbacks redeliver` sends it again.",
        default=86400.0,
        gt=0,
        validation_alias=_env("EDIT_WORKER_CALLBACK_RETRY_SECONDS"),
    )
    callback_backoff_base: float = Field(
        description="First wait (seconds) before a failed callback delivery is tried again; it doubles each try, with jitter.",
        default=5.0,
        gt=0,
        validation_alias=_env("EDIT_WORKER_CALLBACK_BACKOFF_BASE"),
    )
    callback_backoff_max: float = Field(
        description="Longest wait (seconds) between two tries of a callback delivery.",
        default=3600.0,
        gt=0,
        validation_alias=_env("EDIT_WORKER_CALLBACK_BACKOFF_MAX"),
    )
    # Deliveries one pass claims at a time, and the threads it sends them with.
    callback_batch_size: int = Field(
        description="How many due callback deliveries one delivery pass claims at a time.",
        default=50,
        ge=1,
        validation_alias=_env("EDIT_WORKER_CALLBACK_BATCH_SIZE"),
    )
    callback_threads: int = Field(
        description="Concurrent callback deliveries per worker process.",
        default=16,
        ge=1,
        validation_alias=_env("EDIT_WORKER_CALLBACK_THREADS"),
    )

    @property
    def limiter_redis_url(self) -> str:
        return self.redis_url or self.celery_broker_url

    def secret_values(self) -> list[str]:
        """Every configured secret's value, for the log formatter to mask (worker/logs.py)."""
        return [
            value.get_secret_value()
            for value in (self.wavespeed_api_key, self.aws_secret_access_key, self.webhook_secret, self.callback_secret)
            if value is not None
        ]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings(...)` and pass it explicitly."""
    return Settings()


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings built from an explicit environment mapping (for a child process's env, in tests,
    benchmarks and the demo), ignoring this process's environment and any .env file."""
    names = {str(choice).lower() for info in Settings.model_fields.values() for choice in getattr(info.validation_alias, "choices", [])}
    values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k.isupper() and k.lower() in names}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]  # pydantic-settings' init option
