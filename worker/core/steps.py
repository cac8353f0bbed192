"""The step vocabulary: what a Celery message (or an outbox row) asks for, and how the engine
says "do this next". A message only names a step and a job; the job's row decides the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from worker.core.states import State


class Step(str, Enum):
    """A unit of work a worker can be asked to do. Per-job steps name a job; loop steps do not."""

    SUBMIT = "submit"  # task mode: submit this queued job
    POLL = "poll"  # task mode: poll this job's prediction
    UPLOAD = "upload"  # copy this job's outputs to S3 (also batch mode's retry of a failed copy)
    SUBMIT_DUE = "submit_due"  # batch mode: run a submitter pass (no job)
    POLL_DUE = "poll_due"  # batch mode: run a poller pass (no job)
    DELIVER_CALLBACKS = "deliver_callbacks"  # run a callback delivery pass (no job)

    @property
    def per_job(self) -> bool:
        return self in (Step.SUBMIT, Step.POLL, Step.UPLOAD)

    def __str__(self) -> str:
        return self.value


# The step that moves a job on from each waiting state (the reconciler's re-drive).
STEP_FOR_STATE = {State.QUEUED: Step.SUBMIT, State.PROCESSING: Step.POLL, State.UPLOADING: Step.UPLOAD}


@dataclass(frozen=True)
class Next:
    """What a step asks to be scheduled next: a step, for a job (None for the loop steps), after
    `countdown` seconds; `poll_seq` is the claim version a task-mode poll chain carries."""

    step: Step
    job_id: str | None = None
    countdown: float = 0.0
    poll_seq: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", Step(self.step))
        if self.step.per_job != (self.job_id is not None):
            raise ValueError(f"step {self.step.value} {'needs' if self.step.per_job else 'takes no'} job id")


class Publisher(Protocol):
    """Sends a step to the workers (Celery in production, a list in tests)."""

    def publish(self, step: Step, job_id: str | None = None, *, countdown: float = 0.0, poll_seq: int | None = None) -> None: ...


@dataclass
class RecordingPublisher:
    """Collects what would have been sent (tests, dry runs)."""

    sent: list[tuple[Step, str | None, float, int | None]] = field(default_factory=list)

    def publish(self, step: Step, job_id: str | None = None, *, countdown: float = 0.0, poll_seq: int | None = None) -> None:
        self.sent.append((Step(step), job_id, countdown, poll_seq))


def schedule(publisher: Publisher, nxt: Next | None) -> None:
    """Publish `nxt` (nothing for None)."""
    if nxt is not None:
        publisher.publish(nxt.step, nxt.job_id, countdown=max(0.0, nxt.countdown), poll_seq=nxt.poll_seq)
