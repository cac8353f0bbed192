"""One job's submit, from queued to a recorded prediction: the limiter and breaker, the CAS to
`submitting`, the provider call, and what each answer means. Task mode calls `run_submit`; the
batch submitter leases jobs itself and hands each to `send_submit` — the same code from there on.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import undefer
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from models import Job
from worker.adapters import tracing
from worker.adapters.breaker import Gate
from worker.adapters.storage import Storage, sniff_content_type, split_uri
from worker.adapters.wavespeed import EditRequest, Prediction
from worker.core.backoff import compute_backoff
from worker.core.codes import ErrorCode, code_of
from worker.core.deliveries import callbacks_queued
from worker.core.jobs import transition, transition_now, update_if
from worker.core.states import State
from worker.core.steps import Next, Step
from worker.engine.bookkeeping import cancel_at_provider, fail_deadline, job_context, past_deadline
from worker.engine.deps import Deps
from worker.engine.fairshare import tenant_at_cap
from worker.engine.faults import crashpoint
from worker.engine.wakeups import poller_wakeup, wake_callbacks
from worker.errors import AmbiguousSubmitError, PermanentProviderError, ProviderAuthError, StorageError, TransientProviderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ticket:
    """A job just moved queued -> submitting (committed), with what the provider call needs: the
    submit's attempt number, the request, and whether it is the half-open breaker's one probe."""

    job_id: str
    attempt: int
    request: EditRequest
    probe: bool = False  # this submit is the half-open breaker's one probe
    tenant: str | None = None
    trace_parent: str | None = None  # the job's trace (its row's traceparent): the submit's span joins it


def run_submit(deps: Deps, job_id: str) -> Next | None:
    """Task mode's submit of one job (also the reconciler's re-drive of one queued job)."""
    with deps.sessions() as session:
        job = session.get(Job, job_id, options=[undefer(Job.image_payload)])
        if job is None or job.state != State.QUEUED.value:
            return None  # stale or duplicate message
        now = deps.clock()
        if past_deadline(deps, job):
            session.rollback()
            fail_deadline(deps, job_id, State.QUEUED)
            return None
        if job.next_attempt_at and job.next_attempt_at > now + timedelta(seconds=1):
            return None  # early duplicate: the deferred message (or the sweep) will come back for it
        if tenant_at_cap(deps, session, job.tenant):
            # The tenant's in-flight share is used up: wait in `queued`, no attempt spent.
            wait = deps.settings.poll_interval
            update_if(session, job_id, State.QUEUED, clock=deps.clock, next_attempt_at=now + timedelta(seconds=wait))
            session.commit()
            return Next(Step.SUBMIT, job_id, countdown=wait)

        gate = deps.breaker.check()
        probe = gate.probe  # this call holds the half-open breaker's single probe
        moved = False
        try:
            if gate.go and not probe:
                taken, pace_wait = deps.limiter.pace(1)
                if not taken:
                    gate = Gate(pace_wait, "submissions paced (submit_pace_per_second)")
            if gate.go:
                gate = deps.limiter.acquire(job_id)
            if not gate.go:
                # Wait in `queued`, not in a retry storm: no attempt is spent.
                update_if(session, job_id, State.QUEUED, clock=deps.clock, next_attempt_at=now + timedelta(seconds=gate.wait))
                session.commit()
                log.info("submit deferred %.1fs: %s", gate.wait, gate.reason, extra=job_context(job))
                return Next(Step.SUBMIT, job_id, countdown=gate.wait)
            try:
                image = input_image(deps, job.image_uri, job.image_sha256, job.image_payload)
            except StorageError as exc:
                # Never submitted without its image, never failed for it: S3 will come back.
                deps.limiter.release(job_id)
                wait = input_retry_delay(deps)
                update_if(
                    session,
                    job_id,
                    State.QUEUED,
                    clock=deps.clock,
                    next_attempt_at=now + timedelta(seconds=wait),
                    error_code=ErrorCode.INPUT_UNAVAILABLE.value,
                    error_message=str(exc)[:2000],
                )
                session.commit()
                log.warning("input image unreadable, submit retried in %.1fs: %s", wait, exc, extra=job_context(job))
                return Next(Step.SUBMIT, job_id, countdown=wait)

            attempt = job.attempts + 1
            moved = transition(
                session,
                job_id,
                State.QUEUED,
                State.SUBMITTING,
                f"submit attempt {attempt}",
                clock=deps.clock,
                attempts=attempt,
                submitted_at=now,
                next_attempt_at=None,
            )
            if not moved:
                session.rollback()
                deps.limiter.release(job_id)
                return None
            session.commit()
        finally:
            if probe and not moved:
                # The probe was not used (deferred, lost a race, or an error): hand it back at once,
                # or every submission would wait for a probe that never reports.
                deps.breaker.release_probe()
        ticket = Ticket(
            job_id,
            attempt,
            EditRequest(prompt=job.prompt, image=image, size=job.size, seed=job.seed, enable_base64_output=job.enable_base64_output),
            probe,
            job.tenant,
            job.trace_parent,
        )
    return send_submit(deps, ticket)


def input_image(deps: Deps, image_uri: str | None, image_sha256: str | None, image_payload: str | None) -> str:
    """The `image` the provider receives for a job: its input read from S3 as a data: URI with
    base64 (input_delivery=base64), or a presigned GET URL of it (presigned_url, after checking
    that the object is there); a public URL as it is; a pre-0003 row's stored payload. Raises
    StorageError (transient) when S3 cannot serve it — the caller retries, never submits without it."""
    if image_uri is None:
        if not image_payload:
            raise StorageError("the job has no input image reference")
        return image_payload  # a row from before revision 0003
    if not image_uri.startswith("s3://"):
        return image_uri  # a public URL: the provider fetches it
    bucket, key = split_uri(image_uri)
    storage = deps.storage if bucket == deps.storage.bucket else Storage(deps.storage.client, bucket)
    if deps.settings.input_delivery == "presigned_url":
        storage.head(key)  # S3 answers and the object is there: never a URL to nothing
        return storage.presign(key, deps.settings.input_url_expiry_seconds)
    data, content_type = storage.get(key)
    if image_sha256 and hashlib.sha256(data).hexdigest() != image_sha256:
        raise StorageError(f"{image_uri} does not hold the bytes admitted (sha256 differs)")
    if not content_type or not content_type.startswith("image/"):
        content_type = sniff_content_type(data[:16])
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def input_retry_delay(deps: Deps) -> float:
    """How long a job whose input S3 could not serve waits before its next try (S3 outages last
    seconds to minutes; the job's deadline bounds the whole wait)."""
    s = deps.settings
    return max(1.0, compute_backoff(3, base=s.backoff_base, maximum=s.backoff_max, rng=deps.rng))


def send_submit(deps: Deps, ticket: Ticket, *, batch: bool = False) -> Next | None:
    """Everything after queued -> submitting: the provider call and what its answer means, in the
    job's trace (a `job.submit` span). `batch`: called by the batch submitter, which settles the
    breaker and wakes the poller once per batch instead of once per job."""
    with deps.tracing.step(tracing.SUBMIT, ticket.trace_parent, job_id=ticket.job_id, tenant=ticket.tenant, attempt=ticket.attempt) as span:
        return _send_submit(deps, ticket, span, batch=batch)


def _send_submit(deps: Deps, ticket: Ticket, span: tracing.Span, *, batch: bool) -> Next | None:
    s = deps.settings
    job_id, attempt, probe = ticket.job_id, ticket.attempt, ticket.probe
    webhook = None
    if s.webhook_url and s.webhook_secret:
        # A per-job URL: when the provider calls it, the task is certainly this job's — the one
        # way to settle an ambiguous submit that the provider's task list cannot.
        from worker.adapters.webhooks import job_webhook_url

        webhook = job_webhook_url(s.webhook_url, s.webhook_secret, job_id)
    crashpoint("before_submit")
    try:
        prediction = deps.provider.submit(ticket.request, webhook=webhook)
        if _claimed_elsewhere(deps, job_id, prediction.id):
            # An id another job already holds is not this submit's answer (a hostile or broken
            # provider); a task may still have been created and billed: the reconciler lists it.
            raise AmbiguousSubmitError(f"provider answered prediction {prediction.id}, which belongs to another job")
    except AmbiguousSubmitError as exc:
        # The provider may have created (and will bill) a task. Never resubmit blindly: leave the job
        # in `submitting`; the reconciler looks the task up and decides.
        with deps.sessions() as session:
            update_if(
                session, job_id, State.SUBMITTING, clock=deps.clock, error_code=ErrorCode.AMBIGUOUS_SUBMIT.value, error_message=str(exc)
            )
            session.commit()
        span.set(outcome="ambiguous")
        span.error(exc)
        log.warning("ambiguous submit, left for the reconciler: %s", exc, extra=_context(ticket))
        return None
    except ProviderAuthError as exc:
        deps.limiter.release(job_id)
        deps.breaker.trip(s.breaker_open_seconds, f"provider refused the credentials ({exc})")
        log.error(
            "provider refused the credentials; circuit breaker open for %.0fs: %s", s.breaker_open_seconds, exc, extra=_context(ticket)
        )
        span.set(outcome="auth_refused")
        span.error(exc)
        wait = s.breaker_open_seconds
        with deps.sessions() as session:
            transition(
                session,
                job_id,
                State.SUBMITTING,
                State.QUEUED,
                f"provider refused the credentials, submissions paused: {exc}",
                clock=deps.clock,
                next_attempt_at=deps.clock() + timedelta(seconds=wait),
            )
            session.commit()
        return Next(Step.SUBMIT, job_id, countdown=wait)
    except TransientProviderError as exc:
        # The provider answered an error or was not reached: provably no task, so retry later.
        deps.limiter.release(job_id)
        if probe:
            deps.breaker.release_probe()  # the next submit probes again (or the failure re-trips the breaker)
        note_failure(deps, exc)
        wait = compute_backoff(attempt - 1, base=s.backoff_base, maximum=s.backoff_max, retry_after=exc.retry_after, rng=deps.rng)
        with deps.sessions() as session:
            transition(
                session,
                job_id,
                State.SUBMITTING,
                State.QUEUED,
                f"submit failed, retry in {wait:.1f}s: {exc}",
                clock=deps.clock,
                next_attempt_at=deps.clock() + timedelta(seconds=wait),
                error_code=code_of(exc.code, ErrorCode.TRANSIENT),
                error_message=str(exc),
            )
            session.commit()
        span.set(outcome="retry")
        span.error(exc)
        log.warning("submit failed (transient), retry in %.1fs: %s", wait, exc, extra=_context(ticket))
        return Next(Step.SUBMIT, job_id, countdown=wait)
    except PermanentProviderError as exc:
        deps.limiter.release(job_id)
        if probe:
            deps.breaker.release_probe()
        with deps.sessions() as session:
            transition(
                session,
                job_id,
                State.SUBMITTING,
                State.FAILED,
                f"provider refused the job: {exc}",
                clock=deps.clock,
                error_code=code_of(exc.code, ErrorCode.REJECTED),
                error_message=exc.message,
            )
            session.commit()
            queued = callbacks_queued(session)
        span.set(outcome="rejected")
        span.error(exc)
        wake_callbacks(deps, queued)
        return None

    span.set(outcome="accepted", prediction_id=prediction.id)
    crashpoint("after_submit")
    nxt = record_submission(deps, job_id, prediction, wake=not batch)  # first: the paid task must be on record
    if not batch:
        settle_breaker(deps)
    return nxt


def _context(ticket: Ticket) -> dict:
    return {"job_id": ticket.job_id, "tenant": ticket.tenant, "attempt": ticket.attempt, "trace_parent": ticket.trace_parent}


def _claimed_elsewhere(deps: Deps, job_id: str, prediction_id: str) -> bool:
    """Whether another job already holds this prediction id. The database being unreachable here
    is no reason to drop a paid task: False, and the unique constraint stays the backstop."""
    try:
        with deps.sessions() as session:
            return session.scalar(select(Job.id).where(Job.prediction_id == prediction_id, Job.id != job_id).limit(1)) is not None
    except (OperationalError, InterfaceError):
        return False


def settle_breaker(deps: Deps) -> None:
    """A submit went through: the provider is healthy again (closes a half-open breaker)."""
    try:
        deps.breaker.record_success()
        deps.breaker.reset()
    except Exception as exc:  # Redis down: the breaker state catches up on the next call
        log.warning("could not update the breaker after a submit: %s", type(exc).__name__)


def note_failure(deps: Deps, exc: TransientProviderError) -> None:
    s = deps.settings
    if deps.breaker.record_failure(
        threshold=s.outage_failure_threshold, window=s.outage_failure_window, open_seconds=s.outage_open_seconds, reason=str(exc)[:120]
    ):
        log.error("provider outage: circuit breaker open for %.0fs (%s)", s.outage_open_seconds, exc)


def first_poll_delay(deps: Deps) -> float:
    """When to poll a new prediction first: at the model's typical inference time as the provider
    reports it (learned fleet-wide through Redis); the configured first_poll_delay until something
    has been learned (or with adaptive_first_poll off)."""
    s = deps.settings
    if not s.adaptive_first_poll:
        return s.first_poll_delay
    try:
        typical = deps.fleet.typical_inference()
    except Exception:  # Redis down: the configured delay is always a safe answer
        typical = None
    return s.first_poll_delay if typical is None else min(typical, s.first_poll_max)


@retry(
    retry=retry_if_exception_type((OperationalError, InterfaceError)),
    stop=stop_after_delay(120),
    wait=wait_exponential_jitter(initial=0.5, max=10),
    reraise=True,
)
def _commit_prediction(deps: Deps, job_id: str, prediction: Prediction, first_poll: float) -> int | None:
    """The prediction id on the row, in a transaction of its own; the new poll_seq if the job moved
    on to `processing`, None if it had left `submitting` meanwhile."""
    row = transition_now(
        deps.sessions,
        job_id,
        State.SUBMITTING,
        State.PROCESSING,
        f"provider accepted: prediction {prediction.id}",
        clock=deps.clock,
        returning=("poll_seq",),
        prediction_id=prediction.id,
        paid_submissions=Job.paid_submissions + 1,
        poll_seq=Job.poll_seq + 1,
        error_code=None,
        error_message=None,
        next_poll_at=deps.clock() + timedelta(seconds=first_poll),
    )
    if row is not None:
        return row.poll_seq
    # Cancelled (or resolved) meanwhile: still record which provider task belongs to it.
    with deps.sessions() as session:
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        if state is not None:
            update_if(
                session,
                job_id,
                State(state),
                clock=deps.clock,
                where={"prediction_id": None},
                prediction_id=prediction.id,
                paid_submissions=Job.paid_submissions + 1,
            )
        session.commit()
    return None


def record_submission(deps: Deps, job_id: str, prediction: Prediction, *, wake: bool = True) -> Next | None:
    """Commit the prediction id before anything else. The provider has billed this task: a database
    hiccup here is retried in place (re-running the task would pay twice); the id is also journaled
    in Redis so that if this process dies now the reconciler adopts the task instead of guessing.
    `wake`: publish what polls it next (the batch submitter wakes the poller once per batch)."""
    try:
        deps.journal.remember(job_id, prediction.id)
    except Exception:  # the journal is a second line of defence; the database is the record
        log.warning("could not journal prediction %s in Redis", prediction.id, extra={"job_id": job_id})
    crashpoint("after_journal")
    first_poll = first_poll_delay(deps)
    seq = _commit_prediction(deps, job_id, prediction, first_poll)
    if seq is None:
        log.info("job left submitting meanwhile; cancelling provider task %s", prediction.id, extra={"job_id": job_id})
        cancel_at_provider(deps, prediction.id)
        deps.limiter.release(job_id)
        return None
    if deps.settings.poll_mode == "batch":
        return poller_wakeup(deps, first_poll) if wake else Next(Step.POLL_DUE, countdown=first_poll)
    return Next(Step.POLL, job_id, countdown=first_poll, poll_seq=seq)
