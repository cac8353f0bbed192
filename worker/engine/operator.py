"""What an operator (CLI, HTTP API) does to a job: cancel it (at the provider too) or replay a
failed one from the furthest step already paid for.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from models import Job
from worker.core.codes import ErrorCode
from worker.core.deliveries import callbacks_queued
from worker.core.jobs import JobFilter, add_outbox, get_job, transition, update_if
from worker.core.states import ACTIVE, State
from worker.core.steps import Step
from worker.engine.bookkeeping import cancel_at_provider
from worker.engine.deps import Deps
from worker.engine.wakeups import wake_callbacks
from worker.errors import InvalidJobOperation

log = logging.getLogger(__name__)


def cancel_job(deps: Deps, job_id: str, reason: str = "cancelled by operator") -> Job:
    """Cancel a job (and its provider task). Cancelling a cancelled job is a no-op; a finished one
    cannot be cancelled."""
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
            queued = callbacks_queued(session)
        wake_callbacks(deps, queued)
        if moved:
            deps.limiter.release(job_id)
            prediction_id = job.prediction_id
            if state is State.SUBMITTING and not prediction_id:
                # The submit may have answered without its commit (a crash): the journal knows.
                try:
                    prediction_id = deps.journal.recall(job_id)
                except Exception:
                    prediction_id = None
                if prediction_id:
                    with deps.sessions() as session:
                        update_if(
                            session, job_id, State.CANCELLED, clock=deps.clock, where={"prediction_id": None}, prediction_id=prediction_id
                        )
                        session.commit()
            if prediction_id and state in (State.SUBMITTING, State.PROCESSING):
                cancel_at_provider(deps, prediction_id)
            return get_job(deps.sessions, job_id)
    raise InvalidJobOperation(f"job {job_id} kept changing state; try again")


def retry_job(deps: Deps, job_id: str) -> Job:
    """Replay a failed job from the furthest step already paid for: copy known outputs again,
    re-poll a known prediction that did not itself fail, or resubmit when there is nothing to reuse."""
    job = get_job(deps.sessions, job_id, with_payloads=True)
    if job.state != State.FAILED.value:
        raise InvalidJobOperation(f"job {job_id} is {job.state}; only failed jobs can be retried")
    now = deps.clock()
    deadline = now + timedelta(seconds=deps.settings.job_deadline_seconds)
    common = dict(error_code=None, error_message=None, finished_at=None, deadline_at=deadline)
    with deps.sessions() as session:
        if job.provider_outputs:
            target, step, extra = State.UPLOADING, Step.UPLOAD, {}
            reason = "retry: copy the provider's outputs again"
        elif job.prediction_id and job.error_code == ErrorCode.DEADLINE.value:
            target, step = State.PROCESSING, Step.POLL
            extra = {"poll_seq": job.poll_seq + 1, "next_poll_at": now}
            reason = f"retry: poll prediction {job.prediction_id} again"
        else:
            target, step, extra = State.QUEUED, Step.SUBMIT, {"prediction_id": None, "next_attempt_at": None}
            reason = "retry: submit again" + (f" (previous prediction {job.prediction_id} failed)" if job.prediction_id else "")
        fields: dict[str, Any] = {**common, **extra}
        if not transition(session, job_id, State.FAILED, target, reason, clock=deps.clock, **fields):
            raise InvalidJobOperation(f"job {job_id} changed state meanwhile; try again")
        add_outbox(session, job_id, step, now)
        session.commit()
    return get_job(deps.sessions, job_id)


def _matching(
    deps: Deps,
    states: tuple[State, ...],
    *,
    tenant: str | None,
    error_code: str | None,
    since: datetime | None,
    limit: int,
    job_filter: JobFilter | None = None,
) -> list[str]:
    query = select(Job.id).where(Job.state.in_([s.value for s in states])).order_by(Job.created_at).limit(limit)
    if job_filter is not None:  # the console's filter, on top (its states narrow `states` further)
        query = query.where(*job_filter.conditions())
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if error_code:
        query = query.where(Job.error_code == error_code)
    if since is not None:
        query = query.where(func.coalesce(Job.finished_at, Job.updated_at) >= since)
    with deps.sessions() as session:
        return list(session.scalars(query))


def retry_matching(
    deps: Deps,
    *,
    tenant: str | None = None,
    error_code: str | None = None,
    since: datetime | None = None,
    limit: int = 10_000,
    job_filter: JobFilter | None = None,
) -> list[Job]:
    """Bulk replay: every failed job matching the filters (of one tenant, or all for None; and
    `job_filter`, the console's), each from the furthest step already paid for. Jobs that changed
    state meanwhile are skipped."""
    replayed = []
    for job_id in _matching(deps, (State.FAILED,), tenant=tenant, error_code=error_code, since=since, limit=limit, job_filter=job_filter):
        try:
            replayed.append(retry_job(deps, job_id))
        except InvalidJobOperation:
            continue
    return replayed


def cancel_matching(
    deps: Deps,
    *,
    tenant: str | None = None,
    state: State | None = None,
    error_code: str | None = None,
    since: datetime | None = None,
    limit: int = 10_000,
    reason: str = "cancelled by operator (bulk)",
    job_filter: JobFilter | None = None,
) -> list[Job]:
    """Bulk cancel: every unfinished job matching the filters (and its provider task)."""
    states = (state,) if state is not None else tuple(sorted(ACTIVE, key=lambda s: s.value))
    if any(s.terminal for s in states):
        raise InvalidJobOperation("only unfinished jobs can be cancelled")
    cancelled = []
    for job_id in _matching(deps, states, tenant=tenant, error_code=error_code, since=since, limit=limit, job_filter=job_filter):
        try:
            cancelled.append(cancel_job(deps, job_id, reason=reason))
        except InvalidJobOperation:
            continue
    return cancelled
