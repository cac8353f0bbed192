"""Thin Celery tasks: decode the message, call a pipeline function, schedule what it returns,
and map infrastructure errors (database, S3, Redis, output downloads) to a Celery retry.
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from typing import Callable, TypeVar

import redis
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from . import pipeline, reconciler, submitter
from .backoff import compute_backoff
from .celery_app import MAX_COUNTDOWN, QUEUE, app
from .deps import Deps, build_deps
from .errors import StorageError, TransientProviderError
from .jobs import STEP_POLL, STEP_SUBMIT, STEP_SUBMIT_DUE, STEP_UPLOAD

log = logging.getLogger(__name__)
T = TypeVar("T")

# Worth retrying the same step: the row has not moved, so re-running it is safe.
INFRA_ERRORS = (OperationalError, InterfaceError, DBAPIError, StorageError, TransientProviderError,
                redis.ConnectionError, redis.TimeoutError, BrokerError, ConnectionError, TimeoutError)


def _run(task, step: Callable[[Deps], pipeline.Next | None]) -> None:
    deps = build_deps()
    try:
        pipeline.schedule(deps, step(deps))
    except INFRA_ERRORS as exc:
        wait = compute_backoff(task.request.retries, base=2.0, maximum=60.0)
        log.warning("%s: %s; retry in %.1fs", task.name, type(exc).__name__, wait)
        # If this retry cannot be published either (broker down), the row is unchanged and the
        # reconciler's sweep re-drives the job once things are back.
        raise task.retry(exc=exc, countdown=wait, max_retries=None)


@app.task(name="edit_worker.submit", bind=True)
def submit(self, job_id: str) -> None:
    _run(self, lambda deps: pipeline.run_submit(deps, job_id))


@app.task(name="edit_worker.poll", bind=True)
def poll(self, job_id: str, poll_seq: int | None = None) -> None:
    _run(self, lambda deps: pipeline.run_poll(deps, job_id, poll_seq))


@app.task(name="edit_worker.upload", bind=True)
def upload(self, job_id: str) -> None:
    _run(self, lambda deps: pipeline.run_upload(deps, job_id))


def _node(task) -> str:
    return task.request.hostname or socket.gethostname()


def loop_lock_ttl(settings) -> float:
    # A pass runs batch_pass_seconds (plus the batch in hand); a SIGKILLed holder's lock lapses
    # soon after, and a restarted worker clears its own at start (celery_app.worker_ready).
    return 2 * settings.batch_pass_seconds + 5


@app.task(name="edit_worker.poll_due", bind=True)
def poll_due(self) -> None:
    """Batch mode's poller: claim due jobs, poll them concurrently, wake again when the next is due.
    At most poll_passes_per_node passes per worker node at once, so the poller never takes every
    slot of a node."""
    deps = build_deps()
    report = _loop_pass(deps, f"poller:{_node(self)}", deps.settings.poll_passes_per_node,
                        lambda: pipeline.poller_wakeup(deps, BUSY_RETRY),
                        lambda: pipeline.poll_due(deps, max_seconds=deps.settings.batch_pass_seconds))
    if report is None:
        return
    follow: list[pipeline.Next | None] = list(report.uploads)
    if report.next_due_in is not None:
        # A backlog (the pass ran out of time with full batches): chain directly. Otherwise a
        # de-duplicated wake-up at the next half-second boundary, which gathers the jobs coming
        # due meanwhile into one pass instead of a storm of tiny ones.
        follow.append(pipeline.Next(pipeline.STEP_POLL_DUE, "") if report.backlog
                      else pipeline.poller_wakeup(deps, report.next_due_in))
    _schedule_all(deps, follow)


@app.task(name="edit_worker.submit_due", bind=True)
def submit_due(self) -> None:
    """Batch mode's submitter: lease due queued jobs and submit them (submitter.py). At most
    submit_passes_per_node passes per worker node at once; it wakes itself while queued work remains."""
    deps = build_deps()
    report = _loop_pass(deps, f"submitter:{_node(self)}", deps.settings.submit_passes_per_node,
                        lambda: submitter.submitter_wakeup(deps, BUSY_RETRY), lambda: submitter.submit_due(deps))
    if report is None:
        return
    follow: list[pipeline.Next | None] = list(report.schedule)
    if report.next_due_in is not None:
        follow.append(submitter.submitter_wakeup(deps, report.next_due_in, dedupe=report.next_due_in > 0))
    _schedule_all(deps, follow)


def _loop_pass(deps: Deps, name: str, slots: int, when_busy: Callable[[], pipeline.Next | None], run: Callable[[], T]) -> T | None:
    """Run one pass of a batch loop under its node lock; None if the node's slots were busy or the
    pass failed. The caller publishes follow-ups only after this returns, with the lock released:
    a wake-up that arrives at once must find the node free. A failed pass loses nothing: claimed
    and leased jobs come due again after their lease, and beat wakes the loops every few seconds."""
    with _node_pass(deps, name, when_busy, slots=slots) as mine:
        if not mine:
            return None
        try:
            return run()
        except INFRA_ERRORS as exc:
            log.warning("%s pass failed: %s", name.split(":", 1)[0], type(exc).__name__)
            return None


# A pass that finds its node's pass running looks again this much later: the running one may be
# just finishing (and would not see the work this wake-up was for).
BUSY_RETRY = 0.5


@contextmanager
def _node_pass(deps: Deps, name: str, when_busy: Callable[[], pipeline.Next | None], *, slots: int = 1):
    """At most `slots` passes of one loop run on a node at once (a lock per slot in Redis)."""
    lock: str | None = None
    try:
        for slot in range(slots):
            key = f"{name}:{slot}"
            if deps.limits.once(key, ttl=loop_lock_ttl(deps.settings)):
                lock = key
                break
    except redis.RedisError:
        lock = ""  # no Redis: run unlocked (passes only ever claim disjoint jobs)
    if lock is None:
        _schedule_all(deps, [when_busy()])
        yield False
        return
    try:
        yield True
    finally:
        if lock:
            _unlock(deps, lock)


def _schedule_all(deps: Deps, steps: list[pipeline.Next | None]) -> None:
    try:
        for nxt in steps:
            pipeline.schedule(deps, nxt)
    except INFRA_ERRORS as exc:  # broker down: beat's ticks and the sweep wake the loops again
        log.warning("could not publish follow-up steps: %s", type(exc).__name__)


def _unlock(deps: Deps, lock: str) -> None:
    try:
        deps.limits.forget(lock)
    except redis.RedisError:
        pass  # it lapses on its own


@app.task(name="edit_worker.reconcile", bind=True)
def reconcile(self) -> None:
    deps = build_deps()
    # One sweep at a time across the fleet, even if two beats run by mistake.
    lock = redis.Redis.from_url(deps.settings.limiter_redis_url).lock("edit-worker:sweep-lock", timeout=120, blocking=False)
    if not lock.acquire():
        return
    try:
        reconciler.sweep(deps)
    except INFRA_ERRORS as exc:
        log.warning("sweep skipped: %s", type(exc).__name__)
    finally:
        try:
            lock.release()
        except redis.RedisError:
            pass


_TASK_NAMES = {STEP_SUBMIT: submit.name, STEP_POLL: poll.name, STEP_UPLOAD: upload.name, pipeline.STEP_POLL_DUE: poll_due.name,
               STEP_SUBMIT_DUE: submit_due.name}


class CeleryPublisher:
    """Publishes pipeline steps as Celery messages (on `celery`, default: the environment's app)."""

    def __init__(self, celery=None):
        self.celery = celery or app

    def publish(self, step: str, job_id: str, *, countdown: float = 0.0, poll_seq: int | None = None) -> None:
        args = [] if step in (pipeline.STEP_POLL_DUE, STEP_SUBMIT_DUE) else [job_id] if step != STEP_POLL else [job_id, poll_seq]
        # Longer waits are the row's business (next_attempt_at / next_poll_at + the sweep): a
        # countdown near the visibility timeout would be redelivered while still waiting.
        options = {"countdown": min(countdown, MAX_COUNTDOWN)} if countdown > 0 else {}
        self.celery.send_task(_TASK_NAMES[step], args=args, queue=QUEUE, retry=True,
                              retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5}, **options)
