"""The steps of an edit job — submit, poll, upload, cancel, retry — as plain functions over Deps.

Each step re-reads the job row and does only what the row's state calls for, so a duplicate or
stale Celery message is a no-op. A step returns the next step to schedule (or None); transient
infrastructure errors (database, S3, Redis) propagate for the Celery task to retry.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import bindparam, func, select, update

from sqlalchemy.orm import undefer
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential_jitter
from sqlalchemy.exc import OperationalError, InterfaceError

from models import Job

from .backoff import compute_backoff, jittered
from .deps import Deps
from .faults import crashpoint
from .errors import (
    AmbiguousSubmitError,
    InvalidJobOperation,
    PermanentProviderError,
    ProviderAuthError,
    ProviderError,
    TransientProviderError,
)
from .limits import Gate
from .jobs import STEP_POLL, STEP_SUBMIT, STEP_UPLOAD, add_outbox, transition, transition_now, update_if
from .states import State
from .storage import extension_for, sniff_content_type
from .wavespeed import EditRequest, Prediction, PredictionStatus, prediction_error

log = logging.getLogger(__name__)

# Error codes written on jobs (strings in the `error.code` field of the job JSON).
ERR_DEADLINE = "deadline_exceeded"
ERR_AMBIGUOUS = "ambiguous_submit"
ERR_NO_OUTPUTS = "no_outputs"
ERR_BAD_OUTPUT = "bad_output"


@dataclass(frozen=True)
class Next:
    step: str
    job_id: str
    countdown: float = 0.0
    poll_seq: int | None = None


def schedule(deps: Deps, nxt: Next | None) -> None:
    if nxt is not None:
        deps.publisher.publish(nxt.step, nxt.job_id, countdown=max(0.0, nxt.countdown), poll_seq=nxt.poll_seq)


def _ctx(job: Job, **extra) -> dict:
    return {"job_id": job.id, "state": job.state, "prediction_id": job.prediction_id, "attempt": job.attempts, **extra}


def _past_deadline(deps: Deps, job: Job) -> bool:
    return deps.clock() >= job.deadline_at


# --- submit ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ticket:
    """A job just moved queued -> submitting (committed), with what the provider call needs."""

    job_id: str
    attempt: int
    request: EditRequest
    probe: bool = False  # this submit is the half-open breaker's one probe


def run_submit(deps: Deps, job_id: str) -> Next | None:
    """Task mode's submit of one job (also the reconciler's re-drive of one queued job)."""
    with deps.sessions() as session:
        job = session.get(Job, job_id, options=[undefer(Job.image_payload)])
        if job is None or job.state != State.QUEUED.value:
            return None  # stale or duplicate message
        now = deps.clock()
        if _past_deadline(deps, job):
            transition(session, job_id, State.QUEUED, State.FAILED, "deadline passed while queued", clock=deps.clock,
                       error_code=ERR_DEADLINE, error_message="the job's deadline passed before it could be submitted")
            session.commit()
            return None
        if job.next_attempt_at and job.next_attempt_at > now + timedelta(seconds=1):
            return None  # early duplicate: the deferred message (or the sweep) will come back for it

        gate = deps.limits.check_breaker()
        probe = gate.probe  # this call holds the half-open breaker's single probe
        moved = False
        try:
            if gate.open and not probe:
                taken, pace_wait = deps.limits.pace(1)
                if not taken:
                    gate = Gate(pace_wait, "submissions paced (submit_pace_per_second)")
            if gate.open:
                gate = deps.limits.acquire(job_id)
            if not gate.open:
                # Wait in `queued`, not in a retry storm: no attempt is spent.
                update_if(session, job_id, State.QUEUED, clock=deps.clock, next_attempt_at=now + timedelta(seconds=gate.wait))
                session.commit()
                log.info("submit deferred %.1fs: %s", gate.wait, gate.reason, extra=_ctx(job))
                return Next(STEP_SUBMIT, job_id, countdown=gate.wait)

            attempt = job.attempts + 1
            moved = transition(session, job_id, State.QUEUED, State.SUBMITTING, f"submit attempt {attempt}", clock=deps.clock,
                               attempts=attempt, submitted_at=now, next_attempt_at=None)
            if not moved:
                session.rollback()
                deps.limits.release(job_id)
                return None
            session.commit()
        finally:
            if probe and not moved:
                # The probe was not used (deferred, lost a race, or an error): hand it back at once,
                # or every submission would wait for a probe that never reports.
                deps.limits.release_probe()
        ticket = Ticket(job_id, attempt, EditRequest(prompt=job.prompt, image=job.image_payload, size=job.size, seed=job.seed,
                                                     enable_base64_output=job.enable_base64_output), probe)
    return send_submit(deps, ticket)


def send_submit(deps: Deps, ticket: Ticket, *, batch: bool = False) -> Next | None:
    """Everything after queued -> submitting: the provider call and what its answer means.
    `batch`: called by the batch submitter, which settles the breaker and wakes the poller once
    per batch instead of once per job."""
    s = deps.settings
    job_id, attempt, probe = ticket.job_id, ticket.attempt, ticket.probe
    webhook = None
    if s.webhook_url and s.webhook_secret:
        # A per-job URL: when the provider calls it, the task is certainly this job's — the one
        # way to settle an ambiguous submit that the provider's task list cannot.
        from .webhooks import job_webhook_url

        webhook = job_webhook_url(s.webhook_url, s.webhook_secret, job_id)
    crashpoint("before_submit")
    try:
        prediction = deps.provider.submit(ticket.request, webhook=webhook)
    except AmbiguousSubmitError as exc:
        # The provider may have created (and will bill) a task. Never resubmit blindly: leave the job
        # in `submitting`; the reconciler looks the task up and decides.
        with deps.sessions() as session:
            update_if(session, job_id, State.SUBMITTING, clock=deps.clock, error_code=ERR_AMBIGUOUS, error_message=str(exc))
            session.commit()
        log.warning("ambiguous submit, left for the reconciler: %s", exc, extra={"job_id": job_id})
        return None
    except ProviderAuthError as exc:
        deps.limits.release(job_id)
        deps.limits.trip_breaker(s.breaker_open_seconds, f"provider refused the credentials ({exc})")
        log.error("provider refused the credentials; circuit breaker open for %.0fs: %s", s.breaker_open_seconds, exc, extra={"job_id": job_id})
        wait = s.breaker_open_seconds
        with deps.sessions() as session:
            transition(session, job_id, State.SUBMITTING, State.QUEUED, f"provider refused the credentials, submissions paused: {exc}",
                       clock=deps.clock, next_attempt_at=deps.clock() + timedelta(seconds=wait))
            session.commit()
        return Next(STEP_SUBMIT, job_id, countdown=wait)
    except TransientProviderError as exc:
        # The provider answered an error or was not reached: provably no task, so retry later.
        deps.limits.release(job_id)
        if probe:
            deps.limits.release_probe()  # the next submit probes again (or the failure re-trips the breaker)
        _note_failure(deps, exc)
        wait = compute_backoff(attempt - 1, base=s.backoff_base, maximum=s.backoff_max, retry_after=exc.retry_after, rng=deps.rng)
        with deps.sessions() as session:
            transition(session, job_id, State.SUBMITTING, State.QUEUED, f"submit failed, retry in {wait:.1f}s: {exc}",
                       clock=deps.clock, next_attempt_at=deps.clock() + timedelta(seconds=wait),
                       error_code=str(exc.code or "transient"), error_message=str(exc))
            session.commit()
        log.warning("submit failed (transient), retry in %.1fs: %s", wait, exc, extra={"job_id": job_id})
        return Next(STEP_SUBMIT, job_id, countdown=wait)
    except PermanentProviderError as exc:
        deps.limits.release(job_id)
        if probe:
            deps.limits.release_probe()
        with deps.sessions() as session:
            transition(session, job_id, State.SUBMITTING, State.FAILED, f"provider refused the job: {exc}", clock=deps.clock,
                       error_code=str(exc.code or "rejected"), error_message=exc.message)
            session.commit()
        return None

    crashpoint("after_submit")
    nxt = record_submission(deps, job_id, prediction, wake=not batch)  # first: the paid task must be on record
    if not batch:
        settle_breaker(deps)
    return nxt


def settle_breaker(deps: Deps) -> None:
    """A submit went through: the provider is healthy again (closes a half-open breaker)."""
    try:
        deps.limits.record_success()
        deps.limits.reset_breaker()
    except Exception as exc:  # Redis down: the breaker state catches up on the next call
        log.warning("could not update the breaker after a submit: %s", type(exc).__name__)


def _note_failure(deps: Deps, exc: TransientProviderError) -> None:
    s = deps.settings
    if deps.limits.record_failure(threshold=s.outage_failure_threshold, window=s.outage_failure_window,
                                  open_seconds=s.outage_open_seconds, reason=str(exc)[:120]):
        log.error("provider outage: circuit breaker open for %.0fs (%s)", s.outage_open_seconds, exc)


def first_poll_delay(deps: Deps) -> float:
    """When to poll a new prediction first: at the model's typical inference time as the provider
    reports it (learned fleet-wide through Redis); the configured first_poll_delay until something
    has been learned (or with adaptive_first_poll off)."""
    s = deps.settings
    if not s.adaptive_first_poll:
        return s.first_poll_delay
    try:
        typical = deps.limits.typical_inference()
    except Exception:  # Redis down: the configured delay is always a safe answer
        typical = None
    return s.first_poll_delay if typical is None else min(typical, s.first_poll_max)


@retry(retry=retry_if_exception_type((OperationalError, InterfaceError)), stop=stop_after_delay(120),
       wait=wait_exponential_jitter(initial=0.5, max=10), reraise=True)
def _commit_prediction(deps: Deps, job_id: str, prediction: Prediction, first_poll: float) -> int | None:
    """The prediction id on the row, in a transaction of its own; the new poll_seq if the job moved
    on to `processing`, None if it had left `submitting` meanwhile."""
    row = transition_now(deps.sessions, job_id, State.SUBMITTING, State.PROCESSING, f"provider accepted: prediction {prediction.id}",
                         clock=deps.clock, returning=("poll_seq",), prediction_id=prediction.id, poll_seq=Job.poll_seq + 1,
                         error_code=None, error_message=None, next_poll_at=deps.clock() + timedelta(seconds=first_poll))
    if row is not None:
        return row.poll_seq
    # Cancelled (or resolved) meanwhile: still record which provider task belongs to it.
    with deps.sessions() as session:
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        if state is not None:
            update_if(session, job_id, State(state), clock=deps.clock, where={"prediction_id": None}, prediction_id=prediction.id)
        session.commit()
    return None


def record_submission(deps: Deps, job_id: str, prediction: Prediction, *, wake: bool = True) -> Next | None:
    """Commit the prediction id before anything else. The provider has billed this task: a database
    hiccup here is retried in place (re-running the task would pay twice); the id is also journaled
    in Redis so that if this process dies now the reconciler adopts the task instead of guessing.
    `wake`: publish what polls it next (the batch submitter wakes the poller once per batch)."""
    try:
        deps.limits.remember_submission(job_id, prediction.id)
    except Exception:  # the journal is a second line of defence; the database is the record
        log.warning("could not journal prediction %s in Redis", prediction.id, extra={"job_id": job_id})
    crashpoint("after_journal")
    first_poll = first_poll_delay(deps)
    seq = _commit_prediction(deps, job_id, prediction, first_poll)
    if seq is None:
        log.info("job left submitting meanwhile; cancelling provider task %s", prediction.id, extra={"job_id": job_id})
        _cancel_at_provider(deps, prediction.id)
        deps.limits.release(job_id)
        return None
    if deps.settings.poll_mode == "batch":
        return poller_wakeup(deps, first_poll) if wake else Next(STEP_POLL_DUE, "", countdown=first_poll)
    return Next(STEP_POLL, job_id, countdown=first_poll, poll_seq=seq)


# --- poll -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PollTarget:
    job_id: str
    seq: int               # the row's poll_seq this poller holds; every update is a CAS on it
    prediction_id: str


@dataclass(frozen=True)
class Reschedule:
    wait: float
    reason: str | None = None


@dataclass(frozen=True)
class Finish:
    prediction: Prediction


@dataclass(frozen=True)
class Fail:
    reason: str
    code: str
    message: str


Decision = Reschedule | Finish | Fail


def fetch_and_decide(deps: Deps, prediction_id: str) -> Decision:
    """One result lookup and what it means for the job (no database work: safe in a thread pool)."""
    s = deps.settings
    try:
        prediction = deps.provider.result(prediction_id)
    except ProviderAuthError as exc:
        deps.limits.trip_breaker(s.breaker_open_seconds, f"provider refused the credentials ({exc})")
        return Reschedule(s.breaker_open_seconds + jittered(0, s.poll_interval, deps.rng), str(exc))
    except TransientProviderError as exc:
        _note_failure(deps, exc)
        return Reschedule(max(s.poll_interval, compute_backoff(3, base=s.backoff_base, maximum=s.backoff_max,
                                                               retry_after=exc.retry_after, rng=deps.rng)), str(exc))
    except PermanentProviderError as exc:
        return Fail(f"result lookup refused: {exc}", str(exc.code or "rejected"), exc.message)
    deps.limits.record_success()
    crashpoint("mid_poll")
    if not prediction.status.terminal:
        return Reschedule(jittered(s.poll_interval, s.poll_jitter, deps.rng))
    if prediction.status is PredictionStatus.COMPLETED:
        if not prediction.outputs:
            return Fail("provider completed without outputs", ERR_NO_OUTPUTS, "the provider reported completion but returned no outputs")
        return Finish(prediction)
    err = prediction_error(prediction)
    return Fail(f"prediction {prediction.status.value}: {err.message}", str(err.code), err.message)


def apply_decision(deps: Deps, target: PollTarget, decision: Decision, *, chain: bool = True) -> Next | None:
    """Record a poll's outcome with a CAS on the poller's poll_seq. `chain`: a rescheduled job gets
    its own next poll message (task mode); in batch mode the poller finds it by next_poll_at."""
    if isinstance(decision, Reschedule):
        with deps.sessions() as session:
            ok = update_if(session, target.job_id, State.PROCESSING, clock=deps.clock, where={"poll_seq": target.seq},
                           poll_seq=target.seq + 1, next_poll_at=deps.clock() + timedelta(seconds=decision.wait))
            session.commit()
        if not ok:
            return None  # another poller took over this job
        if decision.reason:
            log.warning("poll failed, next in %.1fs: %s", decision.wait, decision.reason,
                        extra={"job_id": target.job_id, "prediction_id": target.prediction_id})
        return Next(STEP_POLL, target.job_id, countdown=decision.wait, poll_seq=target.seq + 1) if chain else None
    deps.limits.release(target.job_id)
    if isinstance(decision, Fail):
        return _fail(deps, target.job_id, State.PROCESSING, decision.reason, decision.code, decision.message)
    prediction = decision.prediction
    moved = transition_now(deps.sessions, target.job_id, State.PROCESSING, State.UPLOADING,
                           f"prediction completed with {len(prediction.outputs)} output(s)", clock=deps.clock,
                           where={"poll_seq": target.seq}, provider_outputs=prediction.outputs,
                           has_nsfw_contents=prediction.has_nsfw_contents, next_poll_at=None)
    return Next(STEP_UPLOAD, target.job_id) if moved is not None else None


def _fail_past_deadline(deps: Deps, job_id: str, prediction_id: str | None) -> None:
    with deps.sessions() as session:
        moved = transition(session, job_id, State.PROCESSING, State.FAILED, "deadline passed while processing", clock=deps.clock,
                           error_code=ERR_DEADLINE, error_message=f"prediction {prediction_id} did not finish before the job's deadline")
        session.commit()
    if moved:
        if prediction_id:
            _cancel_at_provider(deps, prediction_id)
        deps.limits.release(job_id)


def _breaker_pause(deps: Deps) -> Reschedule | None:
    # While the breaker is open (an outage, revoked credentials) polls wait too: no storm of
    # failing calls during the outage, and a jittered spread when it ends.
    paused = deps.limits.breaker_wait()
    return Reschedule(paused + jittered(0, deps.settings.poll_interval, deps.rng)) if paused > 0 else None


def run_poll(deps: Deps, job_id: str, poll_seq: int | None) -> Next | None:
    """Poll one job (task mode's chain link, or a nudge from a webhook); in task mode it then
    chains its own next poll with a countdown, in batch mode the poller takes it from there."""
    with deps.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != State.PROCESSING.value or not job.prediction_id:
            return None
        if poll_seq is not None and job.poll_seq != poll_seq:
            return None  # a stale poll chain; the current one carries the row's poll_seq
        target = PollTarget(job_id, job.poll_seq, job.prediction_id)
        if _past_deadline(deps, job):
            _fail_past_deadline(deps, job_id, job.prediction_id)
            return None
    decision = _breaker_pause(deps) or fetch_and_decide(deps, target.prediction_id)
    return apply_decision(deps, target, decision, chain=deps.settings.poll_mode == "task")


# --- batch polling ----------------------------------------------------------------------------

STEP_POLL_DUE = "poll_due"


@dataclass
class PollBatchReport:
    claimed: int = 0
    rescheduled: int = 0
    finished: int = 0
    failed: int = 0
    next_due_in: float | None = None
    backlog: bool = False  # stopped with full batches still coming: more is due right now
    uploads: list[Next] = field(default_factory=list)


def claim_due(deps: Deps, limit: int) -> list[tuple[PollTarget, datetime]]:
    """Claim up to `limit` jobs whose next_poll_at has come: bump poll_seq (stale pollers lose their
    CAS) and push next_poll_at out by the lease. PostgreSQL: FOR UPDATE SKIP LOCKED, so concurrent
    pollers claim disjoint sets; SQLite serialises writers, and the UPDATE re-checks the due time."""
    now = deps.clock()
    # Materialized: see submitter.lease_queued (a re-run subquery could claim more than `limit`).
    due = (select(Job.id).where(Job.state == State.PROCESSING.value, Job.next_poll_at <= now)
           .order_by(Job.next_poll_at).limit(limit).with_for_update(skip_locked=True)
           .cte("due").prefix_with("MATERIALIZED", dialect="postgresql"))
    stmt = (update(Job)
            .where(Job.id.in_(select(due.c.id)), Job.state == State.PROCESSING.value, Job.next_poll_at <= now)
            .values(poll_seq=Job.poll_seq + 1, next_poll_at=now + timedelta(seconds=deps.settings.poll_lease_seconds), updated_at=now)
            .returning(Job.id, Job.poll_seq, Job.prediction_id, Job.deadline_at)
            .execution_options(synchronize_session=False))
    with deps.sessions() as session:
        rows = session.execute(stmt).all()
        session.commit()
    return [(PollTarget(job_id, seq, prediction_id), deadline) for job_id, seq, prediction_id, deadline in rows if prediction_id]


def _reschedule_many(deps: Deps, items: list[tuple[PollTarget, Reschedule]]) -> int:
    """One executemany UPDATE for every job that polls again later (each a CAS on its poll_seq)."""
    if not items:
        return 0
    now = deps.clock()
    stmt = (update(Job.__table__)
            .where(Job.__table__.c.id == bindparam("b_id"), Job.__table__.c.state == State.PROCESSING.value,
                   Job.__table__.c.poll_seq == bindparam("b_seq"))
            .values(poll_seq=bindparam("b_new"), next_poll_at=bindparam("b_due"), updated_at=now))
    params = [{"b_id": t.job_id, "b_seq": t.seq, "b_new": t.seq + 1, "b_due": now + timedelta(seconds=d.wait)} for t, d in items]
    with deps.sessions() as session:
        session.connection().execute(stmt, params)
        session.commit()
    failures = [d.reason for _, d in items if d.reason]
    if failures:
        log.warning("%d poll(s) failed and wait: %s", len(failures), failures[0])
    return len(items)


def poll_due(deps: Deps, *, max_seconds: float = 10.0, executor=None) -> PollBatchReport:
    """Batch mode: claim due jobs and poll them concurrently over the one pooled HTTP client,
    batch after batch until none is due (or `max_seconds` pass). Never sleeps."""
    s = deps.settings
    report = PollBatchReport()
    started = time.monotonic()
    pool = executor or _poll_executor(s.poll_threads)
    while time.monotonic() - started < max_seconds:
        claimed = claim_due(deps, s.poll_batch_size)
        report.claimed += len(claimed)
        if not claimed:
            break
        now = deps.clock()
        live = []
        for target, deadline in claimed:
            if now >= deadline:
                _fail_past_deadline(deps, target.job_id, target.prediction_id)
                report.failed += 1
            else:
                live.append(target)
        pause = _breaker_pause(deps)
        if pause is not None:
            outcomes = [(Reschedule(pause.wait + jittered(0, s.poll_interval, deps.rng)), None) for _ in live]
        else:
            outcomes = list(pool.map(lambda t: _poll_one(deps, t), live))
        later = [(t, d) for t, (d, _) in zip(live, outcomes) if isinstance(d, Reschedule)]
        report.rescheduled += _reschedule_many(deps, later)
        done = [t.job_id for t, (d, _) in zip(live, outcomes) if not isinstance(d, Reschedule)]
        _release_slots(deps, done)
        _observe_inference(deps, [d.prediction for d, _ in outcomes if isinstance(d, Finish)])
        for target, (decision, nxt) in zip(live, outcomes):
            if isinstance(decision, Reschedule):
                continue
            if isinstance(decision, Finish):
                report.finished += 1
                if nxt is not None:
                    report.uploads.append(nxt)
            else:
                report.failed += 1
        # Keep claiming while a useful batch is due (jobs come due during a batch), until few are
        # or the pass's time is up; stragglers go with the next wake-up's batch (≤ 0.5 s later).
        if len(claimed) < max(1, s.poll_batch_size // 10):
            break
    else:
        report.backlog = True
    report.next_due_in = next_due_in(deps)
    if report.claimed:
        log.info("poller pass: %d claimed, %d finished, %d failed, %d rescheduled in %.2fs; next due in %s", report.claimed,
                 report.finished, report.failed, report.rescheduled, time.monotonic() - started,
                 "-" if report.next_due_in is None else f"{report.next_due_in:.1f}s")
    return report


# Wake-ups are bucketed: many jobs due at about the same time share one poller message.
WAKEUP_BUCKET = 0.5


def poller_wakeup(deps: Deps, delay: float) -> Next | None:
    """A poll_due message due in `delay` s, unless one is already due in the same half second."""
    now = deps.clock().timestamp()
    due = now + max(0.0, delay)
    bucket = math.ceil(due / WAKEUP_BUCKET)  # round up: never wake before the work is due
    try:
        first = deps.limits.once(f"poll-due:{bucket}", ttl=max(delay, 0.0) + 60)
    except Exception:  # Redis down: publish anyway (duplicates are harmless, a lost wake-up is late)
        first = True
    return Next(STEP_POLL_DUE, "", countdown=max(0.0, bucket * WAKEUP_BUCKET - now)) if first else None


def _poll_one(deps: Deps, target: PollTarget) -> tuple[Decision, Next | None]:
    """One job of a poller batch, in a pool thread: fetch the result and act on it — finished jobs
    are copied to S3 right here (upload_inline), failed ones recorded; reschedules are written in
    bulk by the caller."""
    try:
        decision = fetch_and_decide(deps, target.prediction_id)
    except Exception as exc:  # e.g. Redis down while noting the outcome: try this job again later
        return Reschedule(deps.settings.poll_interval, f"{type(exc).__name__} while polling"), None
    if isinstance(decision, Reschedule):
        return decision, None
    try:
        if isinstance(decision, Finish) and deps.settings.upload_inline:
            return decision, finish_inline(deps, target, decision.prediction)
        return decision, apply_decision(deps, target, decision, chain=False)
    except Exception as exc:  # the database is down: the lease runs out and the job is polled again
        log.warning("recording a poll outcome failed: %s", type(exc).__name__, extra={"job_id": target.job_id})
        return Reschedule(deps.settings.poll_lease_seconds), None


def _release_slots(deps: Deps, job_ids: list[str]) -> None:
    # The provider's concurrency slots of predictions that ended (one Redis call for the batch).
    try:
        deps.limits.release_many(job_ids)
    except Exception as exc:  # slots also expire on their own (slot_ttl)
        log.warning("could not release %d limiter slot(s): %s", len(job_ids), type(exc).__name__)


def _observe_inference(deps: Deps, predictions: list[Prediction]) -> None:
    samples = sorted(p.inference_ms for p in predictions if p.inference_ms)
    if not samples or not deps.settings.adaptive_first_poll:
        return
    try:
        deps.limits.observe_inference(samples[len(samples) // 2] / 1000.0)
    except Exception:  # Redis down: keep the last known value
        pass


def next_due_in(deps: Deps) -> float | None:
    """Seconds until the soonest processing job is due (None: nothing is processing)."""
    with deps.sessions() as session:
        soonest = session.scalar(select(func.min(Job.next_poll_at)).where(Job.state == State.PROCESSING.value))
    if soonest is None:
        return None
    if soonest.tzinfo is None:  # SQLite's min() bypasses the column type
        soonest = datetime.fromisoformat(str(soonest)).replace(tzinfo=timezone.utc)
    return max(0.0, (soonest - deps.clock()).total_seconds())


_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _poll_executor(threads: int) -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="poll")
        return _executor


def _fail(deps: Deps, job_id: str, src: State, reason: str, code: str, message: str) -> None:
    with deps.sessions() as session:
        transition(session, job_id, src, State.FAILED, reason, clock=deps.clock, error_code=code[:64], error_message=message)
        session.commit()
    deps.limits.release(job_id)
    return None


# --- upload ---------------------------------------------------------------------------------

SPOOL_BYTES = 8 * 1024 * 1024


def _decode_base64_output(value: str) -> bytes:
    # The provider sends bare base64; accept a data: URI as well.
    if value.startswith("data:"):
        value = value.split(",", 1)[1] if "," in value else ""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PermanentProviderError("an output is neither a URL nor valid base64", code=ERR_BAD_OUTPUT) from None


def copy_outputs(deps: Deps, job_id: str, outputs: list[str]) -> list[str]:
    """Download each output (or decode its base64) and put it at its deterministic S3 key.
    PermanentProviderError: an output is unusable. TransientProviderError (download) and
    StorageError propagate for a retry: the keys are deterministic, so a retry overwrites what a
    crashed attempt left half-done."""
    uris: list[str] = []
    for index, output in enumerate(outputs):
        # Spooled: small outputs stay in memory, large ones go to disk; the bytes are held once.
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as buf:
            if output.startswith(("http://", "https://")):
                declared = deps.provider.download(output, buf)
            else:
                buf.write(_decode_base64_output(output))
                declared = None
            crashpoint("mid_download")
            buf.seek(0)
            content_type = sniff_content_type(buf.read(16), declared)
            key = deps.storage.key_for(job_id, index, extension_for(content_type))
            uris.append(deps.storage.put(key, buf, content_type))
    crashpoint("mid_upload")
    return uris


def _succeed(deps: Deps, job_id: str, uris: list[str]) -> bool:
    moved = transition_now(deps.sessions, job_id, State.UPLOADING, State.SUCCEEDED, f"{len(uris)} output(s) stored in S3",
                           clock=deps.clock, outputs=uris, provider_outputs=None, error_code=None, error_message=None)
    if moved is not None:
        log.info("job succeeded", extra={"job_id": job_id, "outputs": len(uris)})
    return moved is not None


def run_upload(deps: Deps, job_id: str) -> Next | None:
    with deps.sessions() as session:
        row = session.execute(select(Job.state, Job.provider_outputs, Job.deadline_at).where(Job.id == job_id)).first()
        if row is None or row.state != State.UPLOADING.value:
            return None
        if deps.clock() >= row.deadline_at:
            # Keep provider_outputs: `retry` can still copy them while the URLs live (about 7 days).
            transition(session, job_id, State.UPLOADING, State.FAILED, "deadline passed while uploading", clock=deps.clock,
                       error_code=ERR_DEADLINE, error_message="outputs could not be copied to S3 before the job's deadline")
            session.commit()
            return None
        outputs = list(row.provider_outputs or [])
    try:
        uris = copy_outputs(deps, job_id, outputs)
    except PermanentProviderError as exc:
        return _fail(deps, job_id, State.UPLOADING, f"output unusable: {exc}", str(exc.code or "download_failed"), exc.message)
    _succeed(deps, job_id, uris)
    return None


def finish_inline(deps: Deps, target: PollTarget, prediction: Prediction) -> Next | None:
    """Batch mode: the poller that saw a prediction complete copies its outputs at once (in its
    thread pool): processing -> uploading (outputs recorded first), copy, -> succeeded. If the copy
    fails transiently the job stays in `uploading` and an upload task retries it with backoff."""
    moved = transition_now(deps.sessions, target.job_id, State.PROCESSING, State.UPLOADING,
                           f"prediction completed with {len(prediction.outputs)} output(s)", clock=deps.clock,
                           where={"poll_seq": target.seq}, provider_outputs=prediction.outputs,
                           has_nsfw_contents=prediction.has_nsfw_contents, next_poll_at=None)
    if moved is None:
        return None  # another poller (or a cancel) took the job
    try:
        _succeed(deps, target.job_id, copy_outputs(deps, target.job_id, list(prediction.outputs)))
    except PermanentProviderError as exc:
        return _fail(deps, target.job_id, State.UPLOADING, f"output unusable: {exc}", str(exc.code or "download_failed"), exc.message)
    except Exception as exc:  # download, S3 or database trouble: the upload task retries with backoff
        log.warning("copying outputs failed, an upload task retries: %s", type(exc).__name__, extra={"job_id": target.job_id})
        return Next(STEP_UPLOAD, target.job_id, countdown=compute_backoff(0, base=deps.settings.backoff_base, maximum=deps.settings.backoff_max, rng=deps.rng))
    return None


# --- operator actions -----------------------------------------------------------------------

def _cancel_at_provider(deps: Deps, prediction_id: str) -> bool:
    try:
        deps.provider.cancel(prediction_id)
        return True
    except ProviderError as exc:
        log.warning("provider cancel of %s failed: %s", prediction_id, exc)
        return False


def cancel_job(deps: Deps, job_id: str, reason: str = "cancelled by operator") -> Job:
    """Cancel a job (and its provider task). Cancelling a cancelled job is a no-op; a finished one
    cannot be cancelled."""
    from .jobs import get_job

    for _ in range(5):
        job = get_job(deps.sessions, job_id)
        state = State(job.state)
        if state is State.CANCELLED:
            return job
        if state.terminal:
            raise InvalidJobOperation(f"job {job_id} is {state}; only unfinished jobs can be cancelled")
        with deps.sessions() as session:
            moved = transition(session, job_id, state, State.CANCELLED, reason, clock=deps.clock)
            session.commit()
        if moved:
            deps.limits.release(job_id)
            prediction_id = job.prediction_id
            if state is State.SUBMITTING and not prediction_id:
                # The submit may have answered without its commit (a crash): the journal knows.
                try:
                    prediction_id = deps.limits.recall_submission(job_id)
                except Exception:
                    prediction_id = None
                if prediction_id:
                    with deps.sessions() as session:
                        update_if(session, job_id, State.CANCELLED, clock=deps.clock, where={"prediction_id": None},
                                  prediction_id=prediction_id)
                        session.commit()
            if prediction_id and state in (State.SUBMITTING, State.PROCESSING):
                _cancel_at_provider(deps, prediction_id)
            return get_job(deps.sessions, job_id)
    raise InvalidJobOperation(f"job {job_id} kept changing state; try again")


def retry_job(deps: Deps, job_id: str) -> Job:
    """Replay a failed job from the furthest step already paid for: copy known outputs again,
    re-poll a known prediction that did not itself fail, or resubmit when there is nothing to reuse."""
    from .jobs import get_job

    job = get_job(deps.sessions, job_id, with_payloads=True)
    if job.state != State.FAILED.value:
        raise InvalidJobOperation(f"job {job_id} is {job.state}; only failed jobs can be retried")
    now = deps.clock()
    deadline = now + timedelta(seconds=deps.settings.job_deadline_seconds)
    common = dict(error_code=None, error_message=None, finished_at=None, deadline_at=deadline)
    with deps.sessions() as session:
        if job.provider_outputs:
            target, step, extra = State.UPLOADING, STEP_UPLOAD, {}
            reason = "retry: copy the provider's outputs again"
        elif job.prediction_id and job.error_code == ERR_DEADLINE:
            target, step = State.PROCESSING, STEP_POLL
            extra = {"poll_seq": job.poll_seq + 1, "next_poll_at": now}
            reason = f"retry: poll prediction {job.prediction_id} again"
        else:
            target, step, extra = State.QUEUED, STEP_SUBMIT, {"prediction_id": None, "next_attempt_at": None}
            reason = "retry: submit again" + (f" (previous prediction {job.prediction_id} failed)" if job.prediction_id else "")
        if not transition(session, job_id, State.FAILED, target, reason, clock=deps.clock, **common, **extra):
            raise InvalidJobOperation(f"job {job_id} changed state meanwhile; try again")
        add_outbox(session, job_id, step, now)
        session.commit()
    return get_job(deps.sessions, job_id)
