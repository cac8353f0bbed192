"""Beat-driven recovery: the outbox relay, the stuck-job sweep and ambiguous-submit resolution.

SQL is the truth and the broker is disposable: anything a lost message, a dead worker or an
emptied Redis left behind is found here from the rows alone and driven on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum

from sqlalchemy import and_, exists, func, or_, select

from models import Job, Outbox
from worker.adapters.wavespeed import MODEL, Prediction, PredictionStatus
from worker.core.codes import ErrorCode
from worker.core.jobs import get_job, mark_sent, pending_outbox, publish_outbox, take_over_poll, transition, update_if
from worker.core.states import ACTIVE, State
from worker.core.steps import STEP_FOR_STATE, Next, Step, schedule
from worker.engine.bookkeeping import fail_deadline
from worker.engine.deps import Deps
from worker.engine.submit import record_submission
from worker.engine.wakeups import poller_wakeup, submitter_wakeup
from worker.errors import InvalidJobOperation, JobNotFound, ProviderError

log = logging.getLogger(__name__)


class Resolution(str, Enum):
    """What became of a submit stuck in `submitting` (the sweep's counts, `edit-worker resolve`)."""

    ADOPTED = "adopted"  # the provider's task is now the job's; polling it
    GONE = "gone"  # the job had moved on meanwhile: nothing adopted
    RESUBMITTED = "resubmitted"  # the provider holds no task for it: back to queued
    WAITING = "waiting"  # too early to tell: the provider's task list may still show it
    NEEDS_OPERATOR = "needs_operator"  # more than one candidate: parked for `edit-worker resolve`
    UNKNOWN_JOB = "unknown_job"  # (webhook) no job has that id
    NOT_SUBMITTING = "not_submitting"  # (webhook) the job is not waiting for its task
    CLAIMED_ELSEWHERE = "claimed_elsewhere"  # (webhook) another job holds that prediction
    UNVERIFIED = "unverified"  # (webhook) the provider could not confirm the prediction now; the sweep decides
    WRONG_MODEL = "wrong_model"  # (webhook) the prediction is another model's: not adopted
    OUTSIDE_SUBMIT_WINDOW = "outside_submit_window"  # (webhook) created outside the job's submit window

    def __str__(self) -> str:
        return self.value


def relay_outbox(deps: Deps, *, older_than: float = 0.0, limit: int = 1000) -> int:
    """Publish outbox rows not yet sent; a failure to publish leaves them for the next run."""
    cutoff = deps.clock() - timedelta(seconds=older_than)
    rows = pending_outbox(deps.sessions, older_than=cutoff, limit=limit)
    sent: list[int] = []
    try:
        publish_outbox(deps.publisher, rows, sent, batch_submit=deps.settings.submit_mode == "batch")
    finally:
        mark_sent(deps.sessions, sent, clock=deps.clock)
    return len(sent)


@dataclass
class SweepReport:
    relayed: int = 0
    redriven: dict[str, int] = field(default_factory=dict)
    deadline_failed: int = 0
    ambiguous: dict[str, int] = field(default_factory=dict)

    def count(self, bucket: dict[str, int], key: str) -> None:
        bucket[key] = bucket.get(key, 0) + 1


def sweep(deps: Deps, *, limit: int = 500) -> SweepReport:
    """One pass over every non-terminal job whose row has not moved past its own schedule."""
    s = deps.settings
    now = deps.clock()
    stuck = now - timedelta(seconds=s.stuck_after_seconds)
    grace = timedelta(seconds=s.ambiguous_list_grace_seconds)
    report = SweepReport()

    # Select before relaying: a queued job whose outbox row the relay is about to publish must not
    # also be re-driven in the same pass (that would publish its submit twice).
    with deps.sessions() as session:
        unsent = exists().where(and_(Outbox.job_id == Job.id, Outbox.sent_at.is_(None)))
        due = or_(
            and_(Job.state == State.QUEUED.value, func.coalesce(Job.next_attempt_at, Job.updated_at) < stuck, ~unsent),
            and_(Job.state == State.PROCESSING.value, func.coalesce(Job.next_poll_at, Job.updated_at) < stuck),
            and_(Job.state == State.UPLOADING.value, Job.updated_at < stuck),
            and_(
                Job.state == State.SUBMITTING.value,
                Job.updated_at < now - timedelta(seconds=s.http_timeout + s.ambiguous_skew_seconds) - grace,
                or_(Job.error_code.is_(None), Job.error_code != ErrorCode.NEEDS_OPERATOR.value),
            ),
            and_(Job.state.in_([st.value for st in ACTIVE]), Job.deadline_at < now),
        )
        jobs = list(session.scalars(select(Job).where(due).order_by(Job.updated_at).limit(limit)))
    report.relayed = relay_outbox(deps, older_than=2.0)

    for job in jobs:
        state = State(job.state)
        try:
            if state is State.SUBMITTING:
                report.count(report.ambiguous, resolve_ambiguous(deps, job).value)
            elif job.deadline_at < now:
                if fail_deadline(deps, job.id, state, job.prediction_id):
                    report.deadline_failed += 1
            else:
                _redrive(deps, job, state)
                report.count(report.redriven, state.value)
        except ProviderError as exc:
            log.warning("sweep could not handle job: %s", exc, extra={"job_id": job.id, "state": job.state})
    if report.redriven or report.ambiguous or report.deadline_failed:
        log.info("sweep: %s", report)
    return report


def _redrive(deps: Deps, job: Job, state: State) -> None:
    step = STEP_FOR_STATE[state]
    if step == Step.POLL and deps.settings.poll_mode == "batch":
        # The poller claims every due job by next_poll_at; make sure one is awake.
        schedule(deps.publisher, poller_wakeup(deps, 0.0))
        return
    if step == Step.POLL:
        # Take the job over with a new poll_seq: any old chain still alive becomes stale.
        with deps.sessions() as session:
            seq = take_over_poll(session, job.id, job.poll_seq, clock=deps.clock)
            session.commit()
        if seq is not None:
            schedule(deps.publisher, Next(Step.POLL, job.id, poll_seq=seq))
        return
    if step == Step.SUBMIT:
        with deps.sessions() as session:  # touch the row so the next sweep waits a full period again
            update_if(session, job.id, State.QUEUED, clock=deps.clock)
            session.commit()
        if deps.settings.submit_mode == "batch":
            schedule(deps.publisher, submitter_wakeup(deps, 0.0))  # the submitter leases it from the table
            return
    if step == Step.UPLOAD:
        with deps.sessions() as session:
            update_if(session, job.id, State.UPLOADING, clock=deps.clock)
            session.commit()
    schedule(deps.publisher, Next(step, job.id))


def resolve_ambiguous(deps: Deps, job: Job) -> Resolution:
    """A job stuck in `submitting` (a submit that timed out, a worker that died around the call):
    find out whether the provider created a task before doing anything that could pay twice.

    1. The Redis journal names the task            -> adopt it (certain).
    2. The provider lists no unclaimed task of this model created in the submit's time window,
       and the window is over                       -> none was created: back to queued, resubmit.
    3. Exactly one unclaimed candidate, and no other unresolved submit competes for that window
                                                    -> adopt it.
    4. Anything else                                -> leave it for an operator (`edit-worker resolve`).
    """
    journaled = deps.journal.recall(job.id)
    if journaled and not _claimed(deps, journaled):  # a claimed id is not this job's task: list instead
        return _adopt(deps, job, journaled, "journaled by the submitting worker")

    s = deps.settings
    skew = timedelta(seconds=s.ambiguous_skew_seconds)
    window_start, window_end = submit_window(deps, job)
    if deps.clock() < window_end + timedelta(seconds=s.ambiguous_list_grace_seconds):
        return Resolution.WAITING
    candidates = _unclaimed_predictions(deps, window_start, window_end)
    if not candidates:
        with deps.sessions() as session:
            moved = transition(
                session,
                job.id,
                State.SUBMITTING,
                State.QUEUED,
                "provider has no task for the ambiguous submit: resubmitting",
                clock=deps.clock,
                error_code=None,
                error_message=None,
                next_attempt_at=None,
            )
            session.commit()
        deps.limiter.release(job.id)
        if moved:
            schedule(deps.publisher, Next(Step.SUBMIT, job.id))
        return Resolution.RESUBMITTED
    with deps.sessions() as session:
        competitors = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.state == State.SUBMITTING.value,
                Job.id != job.id,
                Job.prediction_id.is_(None),
                Job.submitted_at >= window_start - skew - timedelta(seconds=s.http_timeout),
                Job.submitted_at <= window_end,
            )
        )
    if len(candidates) == 1 and not competitors:
        return _adopt(deps, job, candidates[0].id, "the only unclaimed provider task in the submit's time window")
    message = (
        f"{len(candidates)} unclaimed provider task(s) match the submit's time window and {competitors} other "
        "unresolved submit(s) compete for them; run `edit-worker resolve JOB --adopt PREDICTION_ID` or `--resubmit`"
    )
    with deps.sessions() as session:
        update_if(session, job.id, State.SUBMITTING, clock=deps.clock, error_code=ErrorCode.NEEDS_OPERATOR.value, error_message=message)
        session.commit()
    log.error("ambiguous submit needs an operator: %s", message, extra={"job_id": job.id})
    return Resolution.NEEDS_OPERATOR


def submit_window(deps: Deps, job: Job) -> tuple[datetime, datetime]:
    """When the provider could have created the task of the job's last submit: from its start
    (less the clock skew allowed) to the client's timeout after it (plus the skew)."""
    s = deps.settings
    skew = timedelta(seconds=s.ambiguous_skew_seconds)
    started = job.submitted_at or job.updated_at
    return started - skew, started + timedelta(seconds=s.http_timeout) + skew


def candidates(deps: Deps, job_id: str) -> list[Prediction]:
    """The unclaimed provider tasks of this model created in a stuck submit's time window: what an
    operator chooses from to settle it (`resolve_by_operator`)."""
    job = get_job(deps.sessions, job_id)
    if job.state != State.SUBMITTING.value or job.prediction_id:
        raise InvalidJobOperation(f"job {job_id} is {job.state}; only jobs stuck in submitting can be resolved")
    return _unclaimed_predictions(deps, *submit_window(deps, job))


def _unclaimed_predictions(deps: Deps, start: datetime, end: datetime, max_pages: int = 20) -> list[Prediction]:
    found: list[Prediction] = []
    for page in range(1, max_pages + 1):
        result = deps.provider.list_predictions(page=page, page_size=100, model=MODEL, created_after=start, created_before=end)
        found.extend(result.items)
        if len(result.items) < 100 or page * 100 >= result.total:
            break
    if not found:
        return []
    with deps.sessions() as session:
        claimed = set(session.scalars(select(Job.prediction_id).where(Job.prediction_id.in_([p.id for p in found]))))
    return [p for p in found if p.id not in claimed]


def _claimed(deps: Deps, prediction_id: str) -> bool:
    with deps.sessions() as session:
        return session.scalar(select(Job.id).where(Job.prediction_id == prediction_id).limit(1)) is not None


def _adopt(deps: Deps, job: Job, prediction_id: str, why: str) -> Resolution:
    nxt = record_submission(deps, job.id, Prediction(id=prediction_id, status=PredictionStatus.PROCESSING))
    schedule(deps.publisher, Next(Step.POLL, job.id, poll_seq=nxt.poll_seq) if nxt else None)
    log.info("adopted provider task %s (%s)", prediction_id, why, extra={"job_id": job.id})
    return Resolution.ADOPTED if nxt else Resolution.GONE


def adopt_from_webhook(deps: Deps, job_id: str, prediction_id: str) -> Resolution:
    """The provider called this job's own webhook URL (token checked) about `prediction_id`.
    Adopt it if the job is still waiting in `submitting` without one — once the provider confirms
    the prediction is this model's and was created inside the job's submit window: a webhook
    replayed from another job's URL, or one naming some other task, must not attach it."""

    try:
        job = get_job(deps.sessions, job_id)
    except JobNotFound:
        return Resolution.UNKNOWN_JOB
    if job.state != State.SUBMITTING.value or job.prediction_id:
        return Resolution.NOT_SUBMITTING
    with deps.sessions() as session:
        if session.scalar(select(Job.id).where(Job.prediction_id == prediction_id)):
            return Resolution.CLAIMED_ELSEWHERE
    try:
        prediction = deps.provider.result(prediction_id)
    except ProviderError as exc:
        # Unverifiable now: the sweep's own resolution (journal, task list) settles the job.
        log.warning("webhook adoption not verified: %s", exc, extra={"job_id": job_id, "prediction_id": prediction_id})
        return Resolution.UNVERIFIED
    if prediction.id != prediction_id or prediction.model != MODEL:
        log.warning("webhook names a prediction of another model (%s); not adopted", prediction.model[:80], extra={"job_id": job_id})
        return Resolution.WRONG_MODEL
    s = deps.settings
    skew = timedelta(seconds=s.ambiguous_skew_seconds)
    started = job.submitted_at or job.updated_at
    if prediction.created_at is None or not started - skew <= prediction.created_at <= started + timedelta(seconds=s.http_timeout) + skew:
        log.warning(
            "webhook names a prediction created outside the job's submit window; not adopted",
            extra={"job_id": job_id, "prediction_id": prediction_id},
        )
        return Resolution.OUTSIDE_SUBMIT_WINDOW
    outcome = _adopt(deps, job, prediction_id, "named by the provider's webhook for this job")
    if job.error_code == ErrorCode.NEEDS_OPERATOR.value:
        reexamine_parked(deps)  # it was parked with others: they may be decidable now
    return outcome


def resolve_by_operator(deps: Deps, job_id: str, *, adopt: str | None = None, resubmit: bool = False) -> Resolution:
    """The operator's answer for a submit the reconciler could not settle."""

    job = get_job(deps.sessions, job_id)
    if job.state != State.SUBMITTING.value:
        raise InvalidJobOperation(f"job {job_id} is {job.state}; only jobs stuck in submitting can be resolved")
    if bool(adopt) == bool(resubmit):
        raise InvalidJobOperation("say either --adopt PREDICTION_ID or --resubmit")
    if adopt:
        # prediction_id is unique: adopting another job's task would fail at the commit, after
        # the id was journaled for this job (and every later sweep would trip over it).
        with deps.sessions() as session:
            owner = session.scalar(select(Job.id).where(Job.prediction_id == adopt))
        if owner is not None and owner != job_id:
            raise InvalidJobOperation(f"prediction {adopt} already belongs to job {owner}")
        outcome = _adopt(deps, job, adopt, "named by the operator")
    else:
        with deps.sessions() as session:
            moved = transition(
                session,
                job_id,
                State.SUBMITTING,
                State.QUEUED,
                "operator: resubmit",
                clock=deps.clock,
                error_code=None,
                error_message=None,
                next_attempt_at=None,
            )
            session.commit()
        deps.limiter.release(job_id)
        if moved:
            schedule(deps.publisher, Next(Step.SUBMIT, job_id))
        outcome = Resolution.RESUBMITTED
    reexamine_parked(deps)
    return outcome


def reexamine_parked(deps: Deps) -> dict[str, Resolution]:
    """Settling one of several competing ambiguous submits can make the others decidable (one job
    and one unclaimed task left in a window): look at every job parked for an operator again."""
    with deps.sessions() as session:
        parked = list(
            session.scalars(
                select(Job)
                .where(Job.state == State.SUBMITTING.value, Job.prediction_id.is_(None), Job.error_code == ErrorCode.NEEDS_OPERATOR.value)
                .limit(100)
            )
        )
    outcomes: dict[str, Resolution] = {}
    for job in parked:
        try:
            outcomes[job.id] = resolve_ambiguous(deps, job)
        except ProviderError as exc:  # the provider's list is unavailable: they stay parked
            log.warning("could not re-examine a parked submit: %s", exc, extra={"job_id": job.id})
    return outcomes
