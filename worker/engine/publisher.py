"""Steps as Celery messages: `CeleryPublisher` sends a step by its task name (no import of the
tasks module, so producers never load the engine), capping countdowns below the broker's
visibility timeout."""

from __future__ import annotations

from typing import Any

from worker.core.steps import Step

QUEUE = "edit-worker"
# Redis redelivers an unacked message after the broker's visibility timeout (celery_app.py); every
# countdown we publish stays far below it, or ETA messages would be delivered twice.
MAX_COUNTDOWN = 300.0

# Task names are the contract between publishers and workers (tasks.py registers them).
TASK_NAMES = {step: f"edit_worker.{step.value}" for step in Step}
RECONCILE_TASK = "edit_worker.reconcile"


class CeleryPublisher:
    """Publishes steps as Celery messages on `celery` (a Celery app: `celery_app.app` in production)."""

    def __init__(self, celery: Any):
        self.celery = celery

    def publish(self, step: Step, job_id: str | None = None, *, countdown: float = 0.0, poll_seq: int | None = None) -> None:
        step = Step(step)
        args: list[Any] = [] if not step.per_job else [job_id, poll_seq] if step is Step.POLL else [job_id]
        # Longer waits are the row's business (next_attempt_at / next_poll_at + the sweep): a
        # countdown near the visibility timeout would be redelivered while still waiting.
        options = {"countdown": min(countdown, MAX_COUNTDOWN)} if countdown > 0 else {}
        self.celery.send_task(
            TASK_NAMES[step],
            args=args,
            queue=QUEUE,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            **options,
        )
