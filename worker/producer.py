"""The producer side: validate, store the input image in S3, insert the job with its outbox row in
one transaction, then try to publish at once (the outbox relay covers a broker that is down), read
jobs and wait for them. S3 down at admission refuses the job (AdmissionUnavailable): nothing half-written.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from models import Job
from worker.adapters.database import session_factory
from worker.adapters.redis_client import connect
from worker.adapters.storage import Storage
from worker.adapters.telemetry import MemoryTotals, Recorder, RedisTotals, flush
from worker.adapters.tracing import AdmitSpan, Tracing, shared_tracing
from worker.config import Settings, get_settings
from worker.core import validation
from worker.core.jobs import InputStore, NewJob, create_jobs, mark_submits_sent, utcnow
from worker.core.jobs import get_job as _get_job
from worker.core.states import State
from worker.core.steps import Publisher, Step
from worker.core.tenants import DEFAULT_TENANT, check_admission_in, tenant_rows
from worker.errors import AdmissionUnavailable, EditWorkerError, InvalidInput, StorageError

log = logging.getLogger(__name__)


def _sessions(settings: Settings) -> sessionmaker[Session]:
    return _cached_sessions(settings.database_url)


@lru_cache(maxsize=8)
def _cached_sessions(url: str) -> sessionmaker[Session]:
    # One session factory per database and process (the engine and its pool are shared anyway).
    return session_factory(url)


@lru_cache(maxsize=8)
def _cached_storage(endpoint: str | None, region: str, key_id: str | None, secret: str | None, bucket: str, prefix: str) -> Storage:
    # One boto3 client per S3 configuration and process (creating one costs ~0.1 s).
    settings = Settings(  # type: ignore[call-arg]  # _env_file: pydantic-settings' init option
        _env_file=None,
        s3_endpoint_url=endpoint,
        aws_region=region,
        aws_access_key_id=key_id,
        aws_secret_access_key=SecretStr(secret) if secret else None,
        s3_bucket=bucket,
        s3_prefix=prefix,
    )
    return Storage.from_settings(settings)


def input_store(settings: Settings) -> Storage:
    """Where admission puts input images: S3 as `settings` describe it (one client per process)."""
    secret = settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
    return _cached_storage(
        settings.s3_endpoint_url, settings.aws_region, settings.aws_access_key_id, secret, settings.s3_bucket, settings.s3_prefix
    )


def _publisher() -> Publisher:
    from worker.engine.celery_app import celery_publisher  # the Celery app, not the engine

    return celery_publisher()


def validate_request(
    *,
    image: str,
    prompt: str,
    size: str | None = None,
    seed: int | str | None = None,
    idempotency_key: str | None = None,
    enable_base64_output: bool | None = None,
    tenant: str = DEFAULT_TENANT,
    priority: str | None = None,
    callback_url: str | None = None,
    settings: Settings,
) -> NewJob:
    """Every check, before anything is written (core/validation.validate_request with the
    producer's image rules: a local file or a URL). Raises InvalidInput (a ValueError)."""
    return validation.validate_request(
        image=image,
        prompt=prompt,
        size=size,
        seed=seed,
        idempotency_key=idempotency_key,
        enable_base64_output=enable_base64_output,
        tenant=tenant,
        priority=priority,
        callback_url=callback_url,
        settings=settings,
    )


@lru_cache(maxsize=4)
def _redis_totals(url: str) -> RedisTotals:
    return RedisTotals(connect(url))


def count_created(settings: Settings, pairs: list[tuple[Job, bool]], *, totals: RedisTotals | MemoryTotals | None = None) -> None:
    """`edit_worker_jobs_created_total`: the jobs this admission created, written to the metric
    totals at once (one pipeline per admitted batch; a producer may be a short-lived CLI). A Redis
    that is down loses the counts, never the admission."""
    recorder = Recorder(tenants=settings.metrics_tenant_set)
    for job, created in pairs:
        if created:
            recorder.job_created(job.tenant)
    try:
        flush(recorder, totals if totals is not None else _redis_totals(settings.limiter_redis_url))
    except Exception as exc:
        log.warning("metrics: could not count created jobs (%s)", type(exc).__name__)


def admit(
    settings: Settings,
    requests: list[NewJob],
    *,
    storage: InputStore | None = None,
    totals: RedisTotals | MemoryTotals | None = None,
    tracing: Tracing | None = None,
    default_callbacks: dict[str, str] | None = None,
) -> list[tuple[Job, bool]]:
    """Store the requests' input images in S3, then insert the jobs (one transaction): (job,
    created) pairs. S3 unavailable -> AdmissionUnavailable and nothing written (retry later).
    Each new job starts its own trace here (a `job.admit` span; `tracing` default: the process's,
    from settings), its traceparent kept on the row for the workers' spans."""
    tracing = tracing or shared_tracing(settings)
    spans: dict[str, AdmitSpan] = {}

    def trace(job_id: str, tenant: str) -> str | None:
        # create_jobs may go round again (an idempotency race) with the same ids: one span each.
        if job_id not in spans:
            spans[job_id] = tracing.admit(job_id, tenant)
        return spans[job_id].trace_parent

    try:
        pairs = create_jobs(
            _sessions(settings),
            requests,
            deadline_seconds=settings.job_deadline_seconds,
            idempotency_ttl=settings.idempotency_ttl_seconds,
            inputs=storage or input_store(settings),
            trace=trace if tracing.enabled else None,
            default_callbacks=default_callbacks,
        )
    except BaseException as exc:
        for span in spans.values():
            span.set(outcome="refused")
            span.error(exc)
            span.end()
        if isinstance(exc, StorageError) and not isinstance(exc, AdmissionUnavailable):
            raise AdmissionUnavailable(f"object storage is unavailable, no job was created; try again ({exc})") from None
        raise
    created = {job.id for job, new in pairs if new}
    for job_id, span in spans.items():
        span.set(outcome="created" if job_id in created else "not_created")
        span.end()
    count_created(settings, pairs, totals=totals)
    return pairs


def check_quotas(settings: Settings, requests: list[NewJob]) -> dict[str, str]:
    """Each tenant's quota for its share of `requests` (QuotaExceeded: nothing written), in one
    read of the tenants' rows; answers their default callback URLs (for create_jobs)."""
    counts = Counter(r.tenant for r in requests)
    with _sessions(settings)() as session:
        rows = tenant_rows(session, set(counts))
        now = utcnow()
        for tenant, count in counts.items():
            check_admission_in(session, tenant, rows.get(tenant), count, settings, now)
    return {name: row.callback_url for name, row in rows.items() if row.callback_url}


def enqueue(
    settings: Settings,
    requests: Iterable[NewJob],
    *,
    publisher=None,
    batch_size: int = 500,
    storage: InputStore | None = None,
    tracing: Tracing | None = None,
) -> list[Job]:
    """Check each tenant's quota (QuotaExceeded: nothing written), store inputs and insert in
    batches (one transaction each), then publish the new jobs' first messages. If S3 fails
    mid-way, the batches before are queued and AdmissionUnavailable says how many."""
    return [
        job for job, _ in enqueue_pairs(settings, requests, publisher=publisher, batch_size=batch_size, storage=storage, tracing=tracing)
    ]


def enqueue_pairs(
    settings: Settings,
    requests: Iterable[NewJob],
    *,
    publisher=None,
    batch_size: int = 500,
    storage: InputStore | None = None,
    tracing: Tracing | None = None,
    totals: RedisTotals | MemoryTotals | None = None,
) -> list[tuple[Job, bool]]:
    """enqueue, keeping each job's `created` flag (False: an idempotent replay of an earlier job)."""
    requests = list(requests)
    defaults = check_quotas(settings, requests)
    pairs: list[tuple[Job, bool]] = []
    for start in range(0, len(requests), batch_size):
        try:
            batch = admit(
                settings, requests[start : start + batch_size], storage=storage, tracing=tracing, totals=totals, default_callbacks=defaults
            )
        except AdmissionUnavailable as exc:
            if not pairs:
                raise
            raise AdmissionUnavailable(f"{exc} (the first {start} of {len(requests)} jobs were created)") from None
        pairs.extend(batch)
        publish_new(settings, [job.id for job, created in batch if created], publisher=publisher)
    return pairs


def publish_new(settings: Settings, job_ids: list[str], *, publisher=None) -> None:
    """Eager publish of just-created jobs (each has one unsent submit outbox row: no need to read
    them back), then mark those rows sent in one UPDATE. If the broker is down the jobs are still
    safely queued: their outbox rows stay unsent and the beat relay publishes them later."""
    if not job_ids:
        return
    publisher = publisher or _publisher()
    sent: list[str] = []
    try:
        if settings.submit_mode == "batch":
            # The submitter leases queued jobs from the table: one wake-up stands for all of them.
            publisher.publish(Step.SUBMIT_DUE)
            sent = list(job_ids)
        else:
            for job_id in job_ids:
                publisher.publish(Step.SUBMIT, job_id)
                sent.append(job_id)
    except Exception as exc:  # broker down: not an error for the producer
        log.warning("broker unavailable (%s); %d job(s) stay queued for the outbox relay", type(exc).__name__, len(job_ids) - len(sent))
    finally:
        mark_submits_sent(_sessions(settings), sent)


def submit_edit(
    image: str,
    prompt: str,
    size: str | None = None,
    seed: int | None = None,
    idempotency_key: str | None = None,
    *,
    enable_base64_output: bool | None = None,
    tenant: str = DEFAULT_TENANT,
    priority: str | None = None,
    callback_url: str | None = None,
    settings: Settings | None = None,
    publisher=None,
    storage: InputStore | None = None,
    tracing: Tracing | None = None,
) -> Job:
    """Create an edit job for `tenant` (default `default`); the same idempotency key with the same
    request returns the same job, never a second one (IdempotencyMismatch for a different request;
    QuotaExceeded over the tenant's rate or daily budget). `callback_url`: where to POST the signed
    job JSON when it finishes (default: the tenant's)."""
    settings = settings or get_settings()
    request = validate_request(
        image=image,
        prompt=prompt,
        size=size,
        seed=seed,
        idempotency_key=idempotency_key,
        enable_base64_output=enable_base64_output,
        tenant=tenant,
        priority=priority,
        callback_url=callback_url,
        settings=settings,
    )
    return enqueue(settings, [request], publisher=publisher, storage=storage, tracing=tracing)[0]


def submit_edit_many(
    items: Iterable[Mapping[str, Any]],
    *,
    settings: Settings | None = None,
    publisher=None,
    batch_size: int = 500,
    storage: InputStore | None = None,
    tracing: Tracing | None = None,
) -> list[Job]:
    """Bulk form: every item is validated first (all or nothing), then inserted and published in batches."""
    settings = settings or get_settings()
    requests = []
    for number, item in enumerate(items, start=1):
        try:
            requests.append(validate_request(settings=settings, **dict(item)))
        except TypeError as exc:
            raise InvalidInput(f"item {number}: {exc}") from None
        except InvalidInput as exc:
            raise InvalidInput(f"item {number}: {exc}") from None
    return enqueue(settings, requests, publisher=publisher, batch_size=batch_size, storage=storage, tracing=tracing)


def get_job(job_id: str, *, settings: Settings | None = None, tenant: str | None = None) -> Job:
    """The job (JobNotFound if none, or if `tenant` is given and it is another tenant's)."""
    return _get_job(_sessions(settings or get_settings()), job_id, tenant=tenant)


def wait_for(
    job_id: str,
    timeout: float | None = None,
    *,
    interval: float = 0.5,
    on_change: Callable[[Job], None] | None = None,
    settings: Settings | None = None,
) -> Job:
    """Block until the job is terminal (reads the database; no broker involved). Raises
    TimeoutError with the job's last state if `timeout` passes first."""
    settings = settings or get_settings()
    sessions = _sessions(settings)
    deadline = None if timeout is None else time.monotonic() + timeout
    last_state = None
    while True:
        job = _get_job(sessions, job_id)
        if job.state != last_state:
            last_state = job.state
            if on_change:
                on_change(job)
        if State(job.state).terminal:
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(f"job {job_id} is still {job.state} after {timeout:g}s", job)
        time.sleep(interval)


class WaitTimeout(EditWorkerError, TimeoutError):
    def __init__(self, message: str, job: Job):
        super().__init__(message)
        self.job = job
