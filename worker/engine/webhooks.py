"""What a verified provider webhook does to a job: it nudges the job's poll (an immediate poll
that takes the poll chain over). The webhook never changes a job's state itself; the poll reads
the result from the provider. (Adopting a parked submit's task is the reconciler's.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import Job
from worker.core.jobs import Clock, take_over_poll, utcnow
from worker.core.states import State
from worker.core.steps import Next, Publisher, Step, schedule

log = logging.getLogger(__name__)


class NudgeOutcome(str, Enum):
    POLLED = "polled"  # a poll was published
    UNKNOWN_PREDICTION = "unknown_prediction"  # no job holds that prediction (yet)
    NOT_PROCESSING = "not_processing"  # the job is not waiting on the provider
    RACED = "raced"  # another poller took the job over meanwhile: a chain is alive
    PUBLISH_FAILED = "publish_failed"  # broker down: the sweep picks the job up from next_poll_at

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Nudge:
    """What a webhook did: `polled` (a poll was published), or why not."""

    outcome: NudgeOutcome
    job_id: str | None = None
    poll_seq: int | None = None


def nudge_poll(
    sessions: sessionmaker[Session],
    publisher_factory: Callable[[], Publisher],
    prediction_id: str,
    *,
    clock: Clock = utcnow,
    wakeup: Callable[[], Next | None] | None = None,
) -> Nudge:
    """Take over the job's poll chain with a new poll_seq (CAS) and publish a poll right away.

    The old chain becomes stale and dies at its next message. If publishing fails the row still
    says `next_poll_at=now`, so the reconciler's sweep re-drives the poll. `wakeup` (batch poll
    mode): publish what it answers — a poller wake-up de-duplicated per half second — instead of
    a poll message per job: the job is due now, and a burst of webhooks becomes one batch pass
    rather than one message each, queued ahead of the poller's own wake-ups."""
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.prediction_id == prediction_id))
        if job is None:
            return Nudge(NudgeOutcome.UNKNOWN_PREDICTION)
        if job.state != State.PROCESSING.value:
            return Nudge(NudgeOutcome.NOT_PROCESSING, job.id)
        job_id = job.id
        seq = take_over_poll(session, job_id, job.poll_seq, clock=clock)
        session.commit()
    if seq is None:
        return Nudge(NudgeOutcome.RACED, job_id)
    try:
        if wakeup is not None:
            schedule(publisher_factory(), wakeup())
        else:
            publisher_factory().publish(Step.POLL, job_id, poll_seq=seq)
    except Exception as exc:  # broker down: the sweep picks the job up from next_poll_at
        log.warning(
            "webhook poll not published (%s); left for the sweep",
            type(exc).__name__,
            extra={"job_id": job_id, "prediction_id": prediction_id},
        )
        return Nudge(NudgeOutcome.PUBLISH_FAILED, job_id, seq)
    log.info("webhook: poll published", extra={"job_id": job_id, "prediction_id": prediction_id})
    return Nudge(NudgeOutcome.POLLED, job_id, seq)
