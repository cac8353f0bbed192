"""Thin Celery tasks: decode the message, call an engine function, schedule what it returns,
and map infrastructure errors (database, S3, Redis, output downloads) to a Celery retry. Also the
worker process hooks (fresh connections after fork, clearing a restarted node's pass locks, the
worker's heartbeat).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import redis
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init, worker_ready, worker_shutdown
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from worker import logs
from worker.adapters.database import dispose_all
from worker.adapters.redis_keys import RedisKeys, pass_lock_name
from worker.core.backoff import compute_backoff
from worker.core.steps import Next, Step, schedule
from worker.engine import callbacks, copier, poller, reconciler, submitter
from worker.engine import submit as submit_step
from worker.engine.celery_app import app
from worker.engine.deps import Deps, build_deps, reset_deps
from worker.engine.pools import reset_pools
from worker.engine.publisher import MAX_COUNTDOWN, RECONCILE_TASK, TASK_NAMES
from worker.engine.wakeups import callbacks_wakeup, poller_wakeup, submitter_wakeup
from worker.errors import StorageError, TransientProviderError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Worth retrying the same step: the row has not moved, so re-running it is safe.
INFRA_ERRORS = (
    OperationalError,
    InterfaceError,
    DBAPIError,
    StorageError,
    TransientProviderError,
    redis.ConnectionError,
    redis.TimeoutError,
    BrokerError,
    ConnectionError,
    TimeoutError,
)


# --- where the tasks get their Deps -----------------------------------------------------------

_deps_factory: Callable[[], Deps] = build_deps


def use_deps(factory: Callable[[], Deps] | None) -> None:
    """Have the tasks and the worker hooks take their Deps from `factory` instead of the process's
    production wiring (`build_deps`); None restores that. For tests and embedded workers that
    bring their own Deps."""
    global _deps_factory
    _deps_factory = factory or build_deps


def task_deps() -> Deps:
    """The Deps a task runs with: `build_deps()` unless `use_deps` said otherwise."""
    return _deps_factory()


# --- the tasks --------------------------------------------------------------------------------


def _run(task, step: Callable[[Deps], Next | None]) -> None:
    deps = task_deps()
    try:
        schedule(deps.publisher, step(deps))
    except INFRA_ERRORS as exc:
        wait = compute_backoff(task.request.retries, base=2.0, maximum=60.0, rng=deps.rng)
        log.warning("%s: %s; retry in %.1fs", task.name, type(exc).__name__, wait)
        # If this retry cannot be published either (broker down), the row is unchanged and the
        # reconciler's sweep re-drives the job once things are back.
        raise task.retry(exc=exc, countdown=wait)


# max_retries=None on the task: retry for as long as the outage lasts. (Passing max_retries=None
# to task.retry() would mean "the task's default", which is 3: the fourth outage in a row would fail
# the task and leave the job to the next sweep.)
@app.task(name=TASK_NAMES[Step.SUBMIT], bind=True, max_retries=None)
def submit(self, job_id: str) -> None:
    _run(self, lambda deps: submit_step.run_submit(deps, job_id))


@app.task(name=TASK_NAMES[Step.POLL], bind=True, max_retries=None)
def poll(self, job_id: str, poll_seq: int | None = None) -> None:
    _run(self, lambda deps: poller.run_poll(deps, job_id, poll_seq))


@app.task(name=TASK_NAMES[Step.UPLOAD], bind=True, max_retries=None)
def upload(self, job_id: str) -> None:
    _run(self, lambda deps: copier.run_upload(deps, job_id))


def _node(task) -> str:
    return task.request.hostname or socket.gethostname()


def loop_lock_ttl(settings) -> float:
    # A pass runs batch_pass_seconds (plus the batch in hand); a SIGKILLed holder's lock lapses
    # soon after, and a restarted worker clears its own at start (celery_app.worker_ready).
    return 2 * settings.batch_pass_seconds + 5


@app.task(name=TASK_NAMES[Step.POLL_DUE], bind=True)
def poll_due(self) -> None:
    """Batch mode's poller: claim due jobs, poll them concurrently, wake again when the next is due.
    At most poll_passes_per_node passes per worker node at once, so the poller never takes every
    slot of a node."""
    deps = task_deps()
    report = _loop_pass(
        deps,
        "poller",
        _node(self),
        deps.settings.poll_passes_per_node,
        lambda: poller_wakeup(deps, BUSY_RETRY),
        lambda: poller.poll_due(deps, max_seconds=deps.settings.batch_pass_seconds),
    )
    if report is None:
        return
    follow: list[Next | None] = list(report.uploads)
    if report.next_due_in is not None:
        # A backlog (the pass ran out of time with full batches): chain directly. Otherwise a
        # de-duplicated wake-up at the next half-second boundary, which gathers the jobs coming
        # due meanwhile into one pass instead of a storm of tiny ones.
        follow.append(Next(Step.POLL_DUE) if report.backlog else poller_wakeup(deps, report.next_due_in))
    _schedule_all(deps, follow)


@app.task(name=TASK_NAMES[Step.SUBMIT_DUE], bind=True)
def submit_due(self) -> None:
    """Batch mode's submitter: lease due queued jobs and submit them (submitter.py). At most
    submit_passes_per_node passes per worker node at once; it wakes itself while queued work remains."""
    deps = task_deps()
    report = _loop_pass(
        deps,
        "submitter",
        _node(self),
        deps.settings.submit_passes_per_node,
        lambda: submitter_wakeup(deps, BUSY_RETRY),
        lambda: submitter.submit_due(deps),
    )
    if report is None:
        return
    follow: list[Next | None] = list(report.schedule)
    if report.next_due_in is not None:
        follow.append(submitter_wakeup(deps, report.next_due_in, dedupe=report.next_due_in > 0))
    _schedule_all(deps, follow)


@app.task(name=TASK_NAMES[Step.DELIVER_CALLBACKS], bind=True)
def deliver_callbacks(self) -> None:
    """Deliver due callbacks to producers (engine/callbacks.py); one pass per worker node at once.
    Terminal transitions wake it; it wakes itself for retries due within a countdown's reach, and
    beat's tick covers the rest."""
    deps = build_deps()
    report = _loop_pass(
        deps,
        "callbacks",
        _node(self),
        1,
        lambda: callbacks_wakeup(deps, BUSY_RETRY),
        lambda: callbacks.deliver_due(deps, max_seconds=deps.settings.batch_pass_seconds),
    )
    if report is None or report.next_due_in is None:
        return
    if report.backlog:
        _schedule_all(deps, [Next(Step.DELIVER_CALLBACKS)])
    elif report.next_due_in <= MAX_COUNTDOWN:
        _schedule_all(deps, [callbacks_wakeup(deps, report.next_due_in)])


def _loop_pass(deps: Deps, loop: str, node: str, slots: int, when_busy: Callable[[], Next | None], run: Callable[[], T]) -> T | None:
    """Run one pass of a batch loop under its node lock; None if the node's slots were busy or the
    pass failed. The caller publishes follow-ups only after this returns, with the lock released:
    a wake-up that arrives at once must find the node free. A failed pass loses nothing: claimed
    and leased jobs come due again after their lease, and beat wakes the loops every few seconds."""
    with _node_pass(deps, loop, node, when_busy, slots=slots) as mine:
        if not mine:
            return None
        try:
            return run()
        except INFRA_ERRORS as exc:
            log.warning("%s pass failed: %s", loop, type(exc).__name__)
            return None


# A pass that finds its node's pass running looks again this much later: the running one may be
# just finishing (and would not see the work this wake-up was for).
BUSY_RETRY = 0.5


@contextmanager
def _node_pass(deps: Deps, loop: str, node: str, when_busy: Callable[[], Next | None], *, slots: int = 1):
    """At most `slots` passes of one loop run on a node at once (a lock per slot in Redis)."""
    lock: str | None = None
    try:
        for slot in range(slots):
            key = pass_lock_name(loop, node, slot)
            if deps.fleet.once(key, ttl=loop_lock_ttl(deps.settings)):
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


def _schedule_all(deps: Deps, steps: list[Next | None]) -> None:
    try:
        for nxt in steps:
            schedule(deps.publisher, nxt)
    except INFRA_ERRORS as exc:  # broker down: beat's ticks and the sweep wake the loops again
        log.warning("could not publish follow-up steps: %s", type(exc).__name__)


def _unlock(deps: Deps, lock: str) -> None:
    try:
        deps.fleet.forget(lock)
    except redis.RedisError:
        pass  # it lapses on its own


@app.task(name=RECONCILE_TASK, bind=True)
def reconcile(self) -> None:
    deps = task_deps()
    # One sweep at a time across the fleet, even if two beats run by mistake.
    lock = redis.Redis.from_url(deps.settings.limiter_redis_url).lock(RedisKeys().sweep_lock, timeout=120, blocking=False)
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


# --- worker process hooks ---------------------------------------------------------------------


@worker_ready.connect
def _clear_node_locks(sender=None, **_kw) -> None:
    # A worker restarted after a SIGKILL must not wait for its dead predecessor's pass locks
    # (same node name) to lapse.
    try:
        deps = task_deps()
        loops = (("poller", deps.settings.poll_passes_per_node), ("submitter", deps.settings.submit_passes_per_node), ("callbacks", 1))
        for loop, slots in loops:
            for slot in range(slots):
                deps.fleet.forget(pass_lock_name(loop, sender.hostname, slot))
    except Exception:  # Redis not up yet: the locks lapse on their own
        pass
    finally:
        dispose_all()
        reset_deps()


# How often a worker says it is alive (Fleet.heartbeat); the console counts a worker as seen
# recently within a few of these.
HEARTBEAT_SECONDS = 10.0
_heartbeats: list[threading.Event] = []  # one stop flag per heartbeat thread started


def beat_once(fleet, name: str) -> None:
    """One heartbeat of this worker process (its node name, pid and host)."""
    fleet.heartbeat(name, {"pid": os.getpid(), "host": socket.gethostname()})


def _heartbeat_loop(name: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            beat_once(task_deps().fleet, name)
        except Exception as exc:  # Redis down: the next beat tries again
            log.debug("heartbeat skipped: %s", type(exc).__name__)
        stop.wait(HEARTBEAT_SECONDS)


@worker_ready.connect
def _start_heartbeat(sender=None, **_kw) -> None:
    # A thread in the worker's main process (the pool's children are forked before this signal):
    # it beats while the node lives, whatever its tasks are doing.
    stop = threading.Event()
    _heartbeats.append(stop)
    name = getattr(sender, "hostname", None) or socket.gethostname()
    threading.Thread(target=_heartbeat_loop, args=(name, stop), name="edit-worker-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_kw) -> None:
    while _heartbeats:
        _heartbeats.pop().set()


@worker_process_init.connect
def _fresh_connections_after_fork(**_kw) -> None:
    # A forked pool child must not share the parent's sockets (DB pool, httpx, Redis) or threads.
    dispose_all()
    reset_deps()
    reset_pools()
    callbacks.reset_client()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _context_logging(logger, **_kw) -> None:
    logs.install(logger)
