"""Small pieces every engine step shares: a job's log context, its deadline, failing it (and
handing back its limiter slot), cancelling its provider task.
"""

from __future__ import annotations

import logging

from models import Job
from worker.core.codes import ErrorCode
from worker.core.deliveries import callbacks_queued
from worker.core.jobs import transition
from worker.core.states import State
from worker.engine.deps import Deps
from worker.engine.wakeups import wake_callbacks
from worker.errors import ProviderError

log = logging.getLogger(__name__)


def job_context(job: Job, **extra) -> dict:
    """The `extra` for a log line about `job`."""
    return {
        "job_id": job.id,
        "tenant": job.tenant,
        "state": job.state,
        "prediction_id": job.prediction_id,
        "attempt": job.attempts,
        "trace_parent": job.trace_parent,
        **extra,
    }


def past_deadline(deps: Deps, job: Job) -> bool:
    return deps.clock() >= job.deadline_at


def cancel_at_provider(deps: Deps, prediction_id: str) -> bool:
    """Ask the provider to cancel a task; False (logged) if it would not answer."""
    try:
        deps.provider.cancel(prediction_id)
        return True
    except ProviderError as exc:
        log.warning("provider cancel of %s failed: %s", prediction_id, exc)
        return False


def release_slots(deps: Deps, job_ids: list[str]) -> None:
    """Hand back the provider concurrency slots of jobs whose predictions ended (one Redis call)."""
    if not job_ids:
        return
    try:
        deps.limiter.release_many(job_ids)
    except Exception as exc:  # slots also expire on their own (slot_ttl)
        log.warning("could not release %d limiter slot(s): %s", len(job_ids), type(exc).__name__)


def fail_job(deps: Deps, job_id: str, src: State, reason: str, code: str, message: str) -> None:
    """src -> failed with an error code and message (a CAS), and hand back the job's slot."""
    with deps.sessions() as session:
        transition(session, job_id, src, State.FAILED, reason, clock=deps.clock, error_code=code[:64], error_message=message)
        session.commit()
        queued = callbacks_queued(session)
    deps.limiter.release(job_id)
    wake_callbacks(deps, queued)


_DEADLINE_MESSAGES = {
    State.QUEUED: "the job's deadline passed before it could be submitted",
    State.UPLOADING: "outputs could not be copied to S3 before the job's deadline",
}


def fail_deadline(deps: Deps, job_id: str, state: State, prediction_id: str | None = None) -> bool:
    """The job's deadline passed while it was in `state`: -> failed (deadline_exceeded), its slot
    handed back and, if a prediction was still running, that task cancelled at the provider.
    An uploading job keeps its provider outputs, so `retry` can still copy them while they live."""
    if state is State.PROCESSING:
        message = f"prediction {prediction_id} did not finish before the job's deadline"
    else:
        message = _DEADLINE_MESSAGES.get(state, f"the job did not finish before its deadline (it was {state.value})")
    with deps.sessions() as session:
        moved = transition(
            session,
            job_id,
            state,
            State.FAILED,
            f"deadline passed while {state.value}",
            clock=deps.clock,
            error_code=ErrorCode.DEADLINE.value,
            error_message=message,
        )
        session.commit()
        queued = callbacks_queued(session)
    wake_callbacks(deps, queued)
    if moved:
        deps.limiter.release(job_id)
        if prediction_id and state is State.PROCESSING:
            cancel_at_provider(deps, prediction_id)
    return moved
