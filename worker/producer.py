"""The producer side: validate, insert the job with its outbox row in one transaction, then try to
publish at once (the outbox relay covers a broker that is down), read jobs and wait for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from models import Job
from worker.adapters.database import session_factory
from worker.config import Settings, get_settings
from worker.core import validation
from worker.core.jobs import NewJob, create_jobs, mark_sent, pending_outbox, publish_outbox
from worker.core.jobs import get_job as _get_job
from worker.core.states import State
from worker.core.steps import Publisher
from worker.errors import EditWorkerError, InvalidInput

log = logging.getLogger(__name__)


def _sessions(settings: Settings) -> sessionmaker[Session]:
    return session_factory(settings.database_url)


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
        settings=settings,
    )


def enqueue(settings: Settings, requests: Iterable[NewJob], *, publisher=None, batch_size: int = 500) -> list[Job]:
    """Insert in batches (one transaction each), then publish the new jobs' first messages."""
    sessions = _sessions(settings)
    requests = list(requests)
    jobs: list[Job] = []
    for start in range(0, len(requests), batch_size):
        pairs = create_jobs(sessions, requests[start : start + batch_size], deadline_seconds=settings.job_deadline_seconds)
        jobs.extend(job for job, _ in pairs)
        publish_new(settings, [job.id for job, created in pairs if created], publisher=publisher)
    return jobs


def publish_new(settings: Settings, job_ids: list[str], *, publisher=None) -> None:
    """Eager publish of just-created jobs. If the broker is down the jobs are still safely queued:
    their outbox rows stay unsent and the beat relay publishes them later."""
    if not job_ids:
        return
    sessions = _sessions(settings)
    rows = pending_outbox(sessions, limit=len(job_ids) * 4, job_ids=job_ids)
    sent: list[int] = []
    publisher = publisher or _publisher()
    try:
        publish_outbox(publisher, rows, sent, batch_submit=settings.submit_mode == "batch")
    except Exception as exc:  # broker down: not an error for the producer
        log.warning("broker unavailable (%s); %d job(s) stay queued for the outbox relay", type(exc).__name__, len(rows) - len(sent))
    finally:
        mark_sent(sessions, sent)


def submit_edit(
    image: str,
    prompt: str,
    size: str | None = None,
    seed: int | None = None,
    idempotency_key: str | None = None,
    *,
    enable_base64_output: bool | None = None,
    settings: Settings | None = None,
    publisher=None,
) -> Job:
    """Create an edit job; the same idempotency key returns the same job, never a second one."""
    settings = settings or get_settings()
    request = validate_request(
        image=image,
        prompt=prompt,
        size=size,
        seed=seed,
        idempotency_key=idempotency_key,
        enable_base64_output=enable_base64_output,
        settings=settings,
    )
    return enqueue(settings, [request], publisher=publisher)[0]


def submit_edit_many(
    items: Iterable[Mapping[str, Any]], *, settings: Settings | None = None, publisher=None, batch_size: int = 500
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
    return enqueue(settings, requests, publisher=publisher, batch_size=batch_size)


def get_job(job_id: str, *, settings: Settings | None = None) -> Job:
    return _get_job(_sessions(settings or get_settings()), job_id)


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
