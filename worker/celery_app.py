"""The Celery app and its settings; nothing else.

Celery is transport, SQL is the truth: results are ignored and every message is safe to lose or
to receive twice (the reconciler re-drives from the rows; the steps are compare-and-set).
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init, worker_ready

from .config import Settings, get_settings

QUEUE = "edit-worker"
# Redis redelivers an unacked message after this long. Every countdown we schedule stays far
# below it (publisher caps at MAX_COUNTDOWN), or ETA messages would be delivered twice.
VISIBILITY_TIMEOUT = 1800
MAX_COUNTDOWN = 300.0

def make_app(settings: Settings) -> Celery:
    """A Celery app configured for `settings` (the module-level `app` uses the environment's)."""
    celery = Celery("edit_worker", broker=settings.celery_broker_url, include=["worker.tasks"])
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
                "task": "edit_worker.reconcile",
                "schedule": timedelta(seconds=settings.sweep_interval),
                "options": {"expires": settings.sweep_interval * 2},
            },
        },
    )
    if settings.poll_mode == "batch":
        # A safety net: pollers wake themselves when work is due; this tick covers a lost wake-up.
        celery.conf.beat_schedule["poll-due"] = {
            "task": "edit_worker.poll_due", "schedule": timedelta(seconds=2), "options": {"expires": 4},
        }
    if settings.submit_mode == "batch":
        # The same for the submitter: producers and the submitter itself wake it; this covers a lost one.
        celery.conf.beat_schedule["submit-due"] = {
            "task": "edit_worker.submit_due", "schedule": timedelta(seconds=2), "options": {"expires": 4},
        }
    return celery


app = make_app(get_settings())


@worker_ready.connect
def _clear_node_locks(sender=None, **_kw) -> None:
    # A worker restarted after a SIGKILL must not wait for its dead predecessor's pass locks
    # (same node name) to lapse.
    try:
        from .deps import build_deps

        limits = build_deps().limits
        settings = build_deps().settings
        for loop, slots in (("poller", settings.poll_passes_per_node), ("submitter", settings.submit_passes_per_node)):
            for slot in range(slots):
                limits.forget(f"{loop}:{sender.hostname}:{slot}")
    except Exception:  # Redis not up yet: the locks lapse on their own
        pass
    finally:
        from .db import dispose_all
        from .deps import reset_deps

        dispose_all()
        reset_deps()


@worker_process_init.connect
def _fresh_connections_after_fork(**_kw) -> None:
    # A forked pool child must not share the parent's sockets (DB pool, httpx, Redis).
    from .db import dispose_all
    from .deps import reset_deps

    dispose_all()
    reset_deps()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _context_logging(logger, **_kw) -> None:
    from . import logs

    logs.install(logger)
