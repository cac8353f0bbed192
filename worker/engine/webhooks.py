"""What a verified provider webhook does to a job: it nudges the job's poll (an immediate poll
that takes the poll chain over). The webhook never changes a job's state itself; the poll reads
the result from the provider. (Adopting a parked submit's task is the reconciler's.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import Job
from worker.core.jobs import Clock, take_over_poll, utcnow
from worker.core.states import State
from worker.core.steps import Publisher, Step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Nudge:
    """What a webhook did: `polled` (a poll was published), or why not."""

    outcome: str  # "polled" | "unknown_prediction" | "not_processing" | "raced" | "publish_failed"
    job_id: str | None = None
    poll_seq: int | None = None


def nudge_poll(
    sessions: sessionmaker[Session],
    publisher_factory: Callable[[], Publisher],
    prediction_id: str,
    *,
    clock: Clock = utcnow,
) -> Nudge:
    """Take over the job's poll chain with a new poll_seq (CAS) and publish a poll right away.

    The old chain becomes stale and dies at its next message. If publishing fails the row still
    says `next_poll_at=now`, so the reconciler's sweep re-drives the poll."""
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.prediction_id == prediction_id))
        if job is None:
            return Nudge("unknown_prediction")
        if job.state != State.PROCESSING.value:
            return Nudge("not_processing", job.id)
        job_id = job.id
        seq = take_over_poll(session, job_id, job.poll_seq, clock=clock)
        session.commit()
    if seq is None:
        return Nudge("raced", job_id)  # another poller took the job over meanwhile: a chain is alive
    try:
        publisher_factory().publish(Step.POLL, job_id, poll_seq=seq)
    except Exception as exc:  # broker down: the sweep picks the job up from next_poll_at
        log.warning(
            "webhook poll not published (%s); left for the sweep",
            type(exc).__name__,
            extra={"job_id": job_id, "prediction_id": prediction_id},
        )
        return Nudge("publish_failed", job_id, seq)
    log.info("webhook: poll published", extra={"job_id": job_id, "prediction_id": prediction_id})
    return Nudge("polled", job_id, seq)
