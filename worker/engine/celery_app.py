"""The Celery app and its settings; nothing else (the tasks and worker hooks are in tasks.py).

Celery is transport, SQL is the truth: results are ignored and every message is safe to lose or
to receive twice (the reconciler re-drives from the rows; the steps are compare-and-set).
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery

from worker.config import Settings, get_settings
from worker.core.steps import Step
from worker.engine.publisher import MAX_COUNTDOWN, QUEUE, RECONCILE_TASK, TASK_NAMES, CeleryPublisher

__all__ = ["MAX_COUNTDOWN", "QUEUE", "VISIBILITY_TIMEOUT", "app", "celery_publisher", "make_app"]

# Redis redelivers an unacked message after this long. Every countdown we schedule stays far
# below it (the publisher caps countdowns at MAX_COUNTDOWN), or ETA messages would be delivered twice.
VISIBILITY_TIMEOUT = 1800


def make_app(settings: Settings) -> Celery:
    """A Celery app configured for `settings` (the module-level `app` uses the environment's)."""
    celery = Celery("edit_worker", broker=settings.celery_broker_url, include=["worker.engine.tasks"])
    celery.conf.update(
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # False on purpose: a submit cut off mid-call has been billed but not recorded. Every step is
        # safe to run twice (compare-and-set on the row), so finishing it beats cancelling it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_default_queue=QUEUE,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT, "socket_timeout": 10, "socket_connect_timeout": 5},
        timezone="UTC",
        enable_utc=True,
        worker_send_task_events=False,
        task_time_limit=VISIBILITY_TIMEOUT // 2,
        task_soft_time_limit=VISIBILITY_TIMEOUT // 2 - 60,
        beat_schedule={
            "reconcile": {
                "task": RECONCILE_TASK,
                "schedule": timedelta(seconds=settings.sweep_interval),
                "options": {"expires": settings.sweep_interval * 2},
            },
        },
    )
    # Callbacks: terminal transitions wake the delivery loop; this tick covers a lost wake-up and
    # retries due later than a countdown reaches.
    celery.conf.beat_schedule["deliver-callbacks"] = {
        "task": TASK_NAMES[Step.DELIVER_CALLBACKS],
        "schedule": timedelta(seconds=settings.sweep_interval),
        "options": {"expires": settings.sweep_interval * 2},
    }
    if settings.poll_mode == "batch":
        # A safety net: pollers wake themselves when work is due; this tick covers a lost wake-up.
        celery.conf.beat_schedule["poll-due"] = {
            "task": TASK_NAMES[Step.POLL_DUE],
            "schedule": timedelta(seconds=2),
            "options": {"expires": 4},
        }
    if settings.submit_mode == "batch":
        # The same for the submitter: producers and the submitter itself wake it; this covers a lost one.
        celery.conf.beat_schedule["submit-due"] = {
            "task": TASK_NAMES[Step.SUBMIT_DUE],
            "schedule": timedelta(seconds=2),
            "options": {"expires": 4},
        }
    return celery


app = make_app(get_settings())


def celery_publisher() -> CeleryPublisher:
    """A publisher on this process's app: what producers, the API and `build_deps` use."""
    return CeleryPublisher(app)
