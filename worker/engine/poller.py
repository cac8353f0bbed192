"""Polling: what one result lookup means for a job (`fetch_and_decide`), task mode's per-job poll
chain (`run_poll`), and the batch poller (`poll_due`): claim every job whose `next_poll_at` has
come, look them up concurrently over one pooled client, copy finished ones out, reschedule the rest
in one statement. Nothing here sleeps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select, update

from models import Job
from worker.adapters import tracing
from worker.adapters.wavespeed import Prediction, PredictionStatus, prediction_error
from worker.core.backoff import compute_backoff, jittered
from worker.core.codes import ErrorCode, code_of
from worker.core.jobs import JOBS, as_utc, update_if
from worker.core.states import State
from worker.core.steps import Next, Step
from worker.engine.bookkeeping import fail_deadline, fail_job, past_deadline, release_slots
from worker.engine.copier import finish_inline, finish_many, start_upload
from worker.engine.deps import Deps
from worker.engine.faults import crashpoint
from worker.engine.paid_work import may_end_paid_job
from worker.engine.pools import shared_pool
from worker.engine.submit import note_failure
from worker.errors import PermanentProviderError, ProviderAuthError, ProviderError, TransientProviderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PollTarget:
    """A processing job one poller has claimed: its prediction to look up, and the claim version
    (`seq`) that every write about this poll must still match."""

    job_id: str
    seq: int  # the row's poll_seq this poller holds; every update is a CAS on it
    prediction_id: str
    tenant: str | None = None
    trace_parent: str | None = None  # the job's trace: the poll's span (and an inline copy's) joins it

    def context(self) -> dict:
        """The `extra` for a log line about this poll."""
        return {"job_id": self.job_id, "tenant": self.tenant, "prediction_id": self.prediction_id, "trace_parent": self.trace_parent}


@dataclass(frozen=True)
class Reschedule:
    """Decision: not finished (or not readable now); look again after `wait` seconds."""

    wait: float
    reason: str | None = None


@dataclass(frozen=True)
class Finish:
    """Decision: the prediction completed; copy its outputs out."""

    prediction: Prediction


@dataclass(frozen=True)
class Fail:
    """Decision: the prediction failed for good (or cannot be used): fail the job."""

    reason: str
    code: str
    message: str


Decision = Reschedule | Finish | Fail  # what one result lookup means for a job


def fetch_and_decide(deps: Deps, prediction_id: str) -> Decision:
    """One result lookup and what it means for the job (no database work: safe in a thread pool).
    Only what `may_end_paid_job` allows becomes a Fail; any other error polls again later."""
    s = deps.settings
    try:
        prediction = deps.provider.result(prediction_id)
    except ProviderAuthError as exc:
        deps.breaker.trip(s.breaker_open_seconds, f"provider refused the credentials ({exc})")
        return Reschedule(s.breaker_open_seconds + jittered(0, s.poll_interval, deps.rng), str(exc))
    except ProviderError as exc:
        if may_end_paid_job(exc):
            return Fail(f"result lookup: {exc}", code_of(exc.code, ErrorCode.REJECTED), exc.message)
        if isinstance(exc, TransientProviderError):
            note_failure(deps, exc)
        retry_after = exc.retry_after if isinstance(exc, TransientProviderError) else None
        return Reschedule(
            max(s.poll_interval, compute_backoff(3, base=s.backoff_base, maximum=s.backoff_max, retry_after=retry_after, rng=deps.rng)),
            str(exc),
        )
    deps.breaker.record_success()
    crashpoint("mid_poll")
    if not prediction.status.terminal:
        return Reschedule(jittered(s.poll_interval, s.poll_jitter, deps.rng))
    if prediction.status is PredictionStatus.COMPLETED and prediction.outputs:
        return Finish(prediction)
    if prediction.status is PredictionStatus.COMPLETED:
        err: ProviderError = PermanentProviderError(
            "the provider reported completion but returned no outputs", code=ErrorCode.NO_OUTPUTS.value, definitive=True
        )
        reason = "provider completed without outputs"
    else:
        err = prediction_error(prediction)
        reason = f"prediction {prediction.status.value}: {err.message}"
    if not may_end_paid_job(err):  # cannot happen for an answer parsed from the envelope; the rule says so
        return Reschedule(s.poll_interval, reason)
    return Fail(reason, str(err.code), err.message)


def apply_decision(deps: Deps, target: PollTarget, decision: Decision, *, chain: bool = True) -> Next | None:
    """Record a poll's outcome with a CAS on the poller's poll_seq. `chain`: a rescheduled job gets
    its own next poll message (task mode); in batch mode the poller finds it by next_poll_at."""
    if isinstance(decision, Reschedule):
        with deps.sessions() as session:
            ok = update_if(
                session,
                target.job_id,
                State.PROCESSING,
                clock=deps.clock,
                where={"poll_seq": target.seq},
                poll_seq=target.seq + 1,
                next_poll_at=deps.clock() + timedelta(seconds=decision.wait),
            )
            session.commit()
        if not ok:
            return None  # another poller took over this job
        if decision.reason:
            log.warning(
                "poll failed, next in %.1fs: %s",
                decision.wait,
                decision.reason,
                extra=target.context(),
            )
        return Next(Step.POLL, target.job_id, countdown=decision.wait, poll_seq=target.seq + 1) if chain else None
    deps.limiter.release(target.job_id)
    if isinstance(decision, Fail):
        fail_job(deps, target.job_id, State.PROCESSING, decision.reason, decision.code, decision.message)
        return None
    return Next(Step.UPLOAD, target.job_id) if start_upload(deps, target.job_id, target.seq, decision.prediction) else None


def _breaker_pause(deps: Deps) -> Reschedule | None:
    # While the breaker is open (an outage, revoked credentials) polls wait too: no storm of
    # failing calls during the outage, and a jittered spread when it ends.
    paused = deps.breaker.wait()
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
        target = PollTarget(job_id, job.poll_seq, job.prediction_id, job.tenant, job.trace_parent)
        if past_deadline(deps, job):
            fail_deadline(deps, job_id, State.PROCESSING, job.prediction_id)
            return None
    paused = _breaker_pause(deps)
    if paused is not None:
        return apply_decision(deps, target, paused, chain=deps.settings.poll_mode == "task")
    with _span(deps, target) as span:
        decision = fetch_and_decide(deps, target.prediction_id)
        span.set(outcome=_outcome(decision))
        if isinstance(decision, Finish) and decision.prediction.inference_ms:
            deps.metrics.inference(decision.prediction.inference_ms / 1000.0)
    if isinstance(decision, Finish) and deps.settings.poll_mode == "batch" and deps.settings.upload_inline:
        # A webhook's nudge: copy at once, in this task, rather than through an upload message.
        deps.limiter.release(job_id)
        return finish_inline(deps, job_id, target.seq, decision.prediction, tenant=target.tenant, trace_parent=target.trace_parent)
    return apply_decision(deps, target, decision, chain=deps.settings.poll_mode == "task")


def _span(deps: Deps, target: PollTarget):
    return deps.tracing.step(
        tracing.POLL, target.trace_parent, job_id=target.job_id, tenant=target.tenant, prediction_id=target.prediction_id
    )


def _outcome(decision: Decision) -> str:
    if isinstance(decision, Reschedule):
        return "retry" if decision.reason else "pending"
    return "completed" if isinstance(decision, Finish) else "failed"


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
    due = (
        select(Job.id)
        .where(Job.state == State.PROCESSING.value, Job.next_poll_at <= now)
        .order_by(Job.next_poll_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    stmt = (
        update(Job)
        .where(Job.id.in_(select(due.c.id)), Job.state == State.PROCESSING.value, Job.next_poll_at <= now)
        .values(poll_seq=Job.poll_seq + 1, next_poll_at=now + timedelta(seconds=deps.settings.poll_lease_seconds), updated_at=now)
        .returning(Job.id, Job.poll_seq, Job.prediction_id, Job.deadline_at, Job.tenant, Job.trace_parent)
        .execution_options(synchronize_session=False)
    )
    with deps.sessions() as session:
        rows = session.execute(stmt).all()
        session.commit()
    return [(PollTarget(r.id, r.poll_seq, r.prediction_id, r.tenant, r.trace_parent), r.deadline_at) for r in rows if r.prediction_id]


def _reschedule_many(deps: Deps, items: list[tuple[PollTarget, Reschedule]]) -> int:
    """One executemany UPDATE for every job that polls again later (each a CAS on its poll_seq)."""
    if not items:
        return 0
    now = deps.clock()
    stmt = (
        update(JOBS)
        .where(
            JOBS.c.id == bindparam("b_id"),
            JOBS.c.state == State.PROCESSING.value,
            JOBS.c.poll_seq == bindparam("b_seq"),
        )
        .values(poll_seq=bindparam("b_new"), next_poll_at=bindparam("b_due"), updated_at=now)
    )
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
    pool = executor or shared_pool("poll", s.poll_threads)
    while time.monotonic() - started < max_seconds:
        claimed = claim_due(deps, s.poll_batch_size)
        report.claimed += len(claimed)
        if not claimed:
            break
        now = deps.clock()
        live = []
        for target, deadline in claimed:
            if now >= deadline:
                fail_deadline(deps, target.job_id, State.PROCESSING, target.prediction_id)
                report.failed += 1
            else:
                live.append(target)
        pause = _breaker_pause(deps)
        outcomes: list[tuple[Decision, Next | None]]
        if pause is not None:
            outcomes = [(Reschedule(pause.wait + jittered(0, s.poll_interval, deps.rng)), None) for _ in live]
        else:
            outcomes = list(pool.map(lambda t: _poll_one(deps, t), live))
        # Completed predictions are recorded and copied as one batch (two statements for all).
        finished = [(t.job_id, t.seq, d.prediction) for t, (d, _) in zip(live, outcomes) if isinstance(d, Finish)]
        done = [t.job_id for t, (d, _) in zip(live, outcomes) if not isinstance(d, Reschedule)]
        release_slots(deps, done)  # the predictions ended: their provider slots are free now
        later = [(t, d) for t, (d, _) in zip(live, outcomes) if isinstance(d, Reschedule)]
        report.rescheduled += _reschedule_many(deps, later)
        if finished and s.upload_inline:
            report.uploads.extend(finish_many(deps, finished, pool, contexts={t.job_id: (t.tenant, t.trace_parent) for t in live}))
        _observe_inference(deps, [d.prediction for d, _ in outcomes if isinstance(d, Finish)])
        for decision, nxt in outcomes:
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
        log.info(
            "poller pass: %d claimed, %d finished, %d failed, %d rescheduled in %.2fs; next due in %s",
            report.claimed,
            report.finished,
            report.failed,
            report.rescheduled,
            time.monotonic() - started,
            "-" if report.next_due_in is None else f"{report.next_due_in:.1f}s",
        )
    return report


def _poll_one(deps: Deps, target: PollTarget) -> tuple[Decision, Next | None]:
    """One job of a poller batch, in a pool thread: fetch the result and act on it — failed ones
    recorded here; reschedules and (upload_inline) completed ones are handled in bulk by the
    caller (`_reschedule_many`, `copier.finish_many`). Each job's poll is a span in its own trace,
    though the pass is shared."""
    with _span(deps, target) as span:
        try:
            decision = fetch_and_decide(deps, target.prediction_id)
        except Exception as exc:  # e.g. Redis down while noting the outcome: try this job again later
            span.set(outcome="retry")
            span.error(exc)
            return Reschedule(deps.settings.poll_interval, f"{type(exc).__name__} while polling"), None
        span.set(outcome=_outcome(decision))
    if isinstance(decision, Reschedule) or (isinstance(decision, Finish) and deps.settings.upload_inline):
        return decision, None  # a completed prediction is copied with the rest of its batch (finish_many)
    try:
        return decision, apply_decision(deps, target, decision, chain=False)
    except Exception as exc:  # the database is down: the lease runs out and the job is polled again
        log.warning("recording a poll outcome failed: %s", type(exc).__name__, extra=target.context())
        return Reschedule(deps.settings.poll_lease_seconds), None


def _observe_inference(deps: Deps, predictions: list[Prediction]) -> None:
    samples = sorted(p.inference_ms for p in predictions if p.inference_ms)
    for ms in samples:
        deps.metrics.inference(ms / 1000.0)
    if not samples or not deps.settings.adaptive_first_poll:
        return
    try:
        deps.fleet.observe_inference(samples[len(samples) // 2] / 1000.0)
    except Exception:  # Redis down: keep the last known value
        pass


def next_due_in(deps: Deps) -> float | None:
    """Seconds until the soonest processing job is due (None: nothing is processing)."""
    with deps.sessions() as session:
        soonest = session.scalar(select(func.min(Job.next_poll_at)).where(Job.state == State.PROCESSING.value))
    if soonest is None:
        return None
    return max(0.0, (as_utc(soonest) - deps.clock()).total_seconds())
