"""Specification of the thin Celery tasks and the worker hooks (worker/engine/tasks.py): each task
runs its engine function and schedules what it returns; an infrastructure error becomes a Celery
retry with backoff (forever: the row has not moved, so running the step again is safe), a bug
does not; a batch loop's pass takes one of its node's slots and, when they are all busy, publishes
a wake-up instead of running; the worker hooks give a forked child fresh connections and clear a
restarted node's pass locks.

The tasks get the test's Deps through `tasks.use_deps`. `task.apply()` runs a task as Celery's
eager mode does (a retry runs the task again at once); `as_worker` runs it with a request as a
worker would deliver it, so a retry surfaces as Celery's `Retry` with its countdown.
"""

from __future__ import annotations

import logging
import random
import socket

import pytest
import redis
from celery.exceptions import Retry
from celery.signals import after_setup_logger, worker_process_init, worker_ready, worker_shutdown
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import OperationalError

from worker.adapters.breaker import MemoryBreaker
from worker.adapters.database import get_engine
from worker.adapters.redis_keys import pass_lock_name
from worker.adapters.storage import Storage
from worker.core.backoff import compute_backoff
from worker.core.steps import Step
from worker.engine import tasks
from worker.engine.celery_app import VISIBILITY_TIMEOUT
from worker.engine.deps import build_deps, reset_deps
from worker.engine.pools import reset_pools, shared_pool
from worker.errors import StorageError
from worker.logs import ContextFormatter


@pytest.fixture(autouse=True)
def injected(deps):
    """Every task in this file runs with the test's Deps; the production wiring comes back after."""
    tasks.use_deps(lambda: deps)
    reset_pools()  # a pass borrows the process's poll/submit pools: fresh ones, sized by these settings
    yield deps
    worker_shutdown.send(sender=None)  # stops a heartbeat thread a worker_ready started
    tasks.use_deps(None)
    reset_pools()


@pytest.fixture
def batch(deps):
    deps.settings = deps.settings.model_copy(
        update={"poll_mode": "batch", "submit_mode": "batch", "poll_threads": 4, "submit_threads": 2, "submit_backpressure_seconds": 0.0}
    )
    return deps


def as_worker(task, *args, retries: int = 0, hostname: str = "node-a"):
    """Run `task` with a request like a worker's (its `retries`, its node): not called directly, so
    a retry raises Celery's `Retry` (carrying the countdown) instead of re-raising the error."""
    task.push_request(id="test-task", args=list(args), kwargs={}, retries=retries, hostname=hostname, is_eager=True, called_directly=False)
    try:
        return task.run(*args)
    finally:
        task.pop_request()


class StorageDown(Storage):
    """Real S3 (moto) underneath; the first `failures` puts raise `error`."""

    def __init__(self, inner: Storage, failures: int, error: Exception):
        super().__init__(inner.client, inner.bucket, inner.prefix)
        self.failures = failures
        self.error = error

    def put(self, key, body, content_type):
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return super().put(key, body, content_type)


class RedisDown(MemoryBreaker):
    def check(self):
        raise redis.ConnectionError("redis unreachable")


# --- the thin tasks: an engine function, then schedule what it returned --------------------------


def test_the_submit_task_submits_the_job_and_schedules_its_first_poll(deps, new_job, load, publisher, fake_provider):
    job_id = new_job()
    tasks.submit.apply(args=[job_id], throw=True)
    job = load(job_id)
    assert job.state == "processing" and job.prediction_id == fake_provider.submissions[0].id
    assert publisher.sent == [(Step.POLL, job_id, deps.settings.first_poll_delay, job.poll_seq)]


def test_the_poll_task_polls_and_schedules_the_upload(deps, new_job, load, publisher, submitted):
    job_id = new_job()
    first = submitted(deps, job_id)
    tasks.poll.apply(args=[job_id, first.poll_seq], throw=True)
    assert load(job_id).state == "uploading"
    assert publisher.sent == [(Step.UPLOAD, job_id, 0.0, None)]


def test_the_upload_task_copies_the_outputs_and_schedules_nothing(deps, new_job, load, publisher, to_upload, list_keys):
    job_id = new_job()
    to_upload(deps, job_id)
    tasks.upload.apply(args=[job_id], throw=True)
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png"]
    assert publisher.sent == []


def test_a_stale_message_runs_nothing_and_schedules_nothing(deps, new_job, publisher, submitted, fake_provider):
    job_id = new_job()
    first = submitted(deps, job_id)
    tasks.poll.apply(args=[job_id, first.poll_seq - 1], throw=True)
    tasks.submit.apply(args=[job_id], throw=True)
    assert publisher.sent == []
    assert fake_provider.calls["result"] == 0 and fake_provider.calls["submit"] == 1


def test_the_submit_due_task_submits_the_queued_jobs_and_wakes_the_poller(batch, new_job, load, publisher, fake_provider):
    ids = [new_job(prompt=f"job {i}") for i in range(3)]
    tasks.submit_due.apply(throw=True)
    assert {load(i).state for i in ids} == {"processing"} and len(fake_provider.submissions) == 3
    assert [step for step, *_ in publisher.sent] == [Step.POLL_DUE]


def test_the_poll_due_task_finishes_the_due_jobs(batch, new_job, load, clock, publisher, list_keys):
    ids = [new_job(prompt=f"job {i}") for i in range(3)]
    tasks.submit_due.apply(throw=True)
    publisher.sent.clear()
    clock.advance(batch.settings.first_poll_delay)
    tasks.poll_due.apply(throw=True)
    assert {load(i).state for i in ids} == {"succeeded"} and len(list_keys()) == 3
    assert publisher.sent == []  # copied inline, nothing left to wake for


# --- infrastructure errors: a Celery retry with backoff ------------------------------------------


@pytest.mark.parametrize("retries", [0, 3, 12])
def test_an_infrastructure_error_becomes_a_retry_with_backoff_and_the_row_stays(deps, new_job, load, to_upload, retries):
    job_id = new_job()
    to_upload(deps, job_id)
    deps.storage = StorageDown(deps.storage, failures=1, error=StorageError("S3 unavailable"))
    twin = random.Random()
    twin.setstate(deps.rng.getstate())
    with pytest.raises(Retry) as retry:
        as_worker(tasks.upload, job_id, retries=retries)
    assert isinstance(retry.value.exc, StorageError)
    # Exponential backoff with full jitter from the task's retry count, drawn from the Deps' RNG.
    assert retry.value.when == compute_backoff(retries, base=2.0, maximum=60.0, rng=twin)
    assert 0 <= retry.value.when <= min(60.0, 2.0 * 2**retries)
    assert load(job_id).state == "uploading"


def test_retries_never_run_out_while_the_outage_lasts(deps, new_job, to_upload):
    """Celery's default (max_retries=3) would fail the task on its fourth outage in a row and leave
    the job to the next sweep; the tasks keep retrying, each wait capped below the visibility timeout."""
    job_id = new_job()
    to_upload(deps, job_id)
    deps.storage = StorageDown(deps.storage, failures=100, error=StorageError("S3 unavailable"))
    for retries in (3, 4, 50):
        with pytest.raises(Retry) as retry:
            as_worker(tasks.upload, job_id, retries=retries)
        assert retry.value.when <= 60.0 < VISIBILITY_TIMEOUT


def test_a_retried_step_runs_again_and_finishes_once_the_outage_is_over(deps, new_job, load, to_upload, list_keys):
    job_id = new_job()
    to_upload(deps, job_id)
    deps.storage = StorageDown(deps.storage, failures=2, error=StorageError("S3 unavailable"))
    result = tasks.upload.apply(args=[job_id])  # eager mode runs each retry at once
    assert result.successful()
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png"]


def test_a_redis_outage_during_a_submit_is_retried_without_calling_the_provider(deps, new_job, load, fake_provider, clock):
    job_id = new_job()
    deps.breaker = RedisDown(clock=clock.monotonic)
    with pytest.raises(Retry) as retry:
        as_worker(tasks.submit, job_id)
    assert isinstance(retry.value.exc, redis.ConnectionError)
    assert load(job_id).state == "queued" and load(job_id).attempts == 0
    assert fake_provider.calls["submit"] == 0


def test_a_broker_outage_after_the_step_ran_is_retried_and_the_retry_does_not_pay_twice(deps, new_job, load, fake_provider):
    class BrokerDown:
        def publish(self, *args, **kwargs):
            raise BrokerError("broker unreachable")

    job_id = new_job()
    deps.publisher = BrokerDown()
    with pytest.raises(Retry) as retry:
        as_worker(tasks.submit, job_id)
    assert isinstance(retry.value.exc, BrokerError)
    assert load(job_id).state == "processing"  # the step itself went through
    as_worker(tasks.submit, job_id)  # the retry: the row has moved on, so it is a no-op
    assert fake_provider.calls["submit"] == 1


def test_a_bug_is_not_retried(deps, new_job, load, to_upload):
    job_id = new_job()
    to_upload(deps, job_id)
    deps.storage = StorageDown(deps.storage, failures=1, error=ValueError("a bug, not an outage"))
    with pytest.raises(ValueError, match="a bug"):
        as_worker(tasks.upload, job_id)


# --- batch loops: one pass per node slot ---------------------------------------------------------


@pytest.mark.parametrize("slots", [1, 2])
def test_a_poller_pass_takes_a_node_slot_and_with_all_slots_busy_a_wakeup_is_published_instead(
    batch, new_job, load, clock, publisher, fake_provider, slots
):
    batch.settings = batch.settings.model_copy(update={"poll_passes_per_node": slots, "poll_batch_size": 1})
    ids = [new_job(prompt=f"job {i}") for i in range(slots + 2)]
    tasks.submit_due.apply(throw=True)
    publisher.sent.clear()
    clock.advance(batch.settings.first_poll_delay)

    # While a pass polls (inside the provider call), another pass starts on the same node.
    ran: list[bool] = []

    def another_pass(_request):
        before = fake_provider.calls["result"]
        as_worker(tasks.poll_due)
        ran.append(fake_provider.calls["result"] > before)

    fake_provider.script("result", *[another_pass] * slots)
    as_worker(tasks.poll_due)
    # Pass k (k <= slots) found a free slot and polled; pass slots + 1 found none and polled nothing.
    assert list(reversed(ran)) == [True] * (slots - 1) + [False]
    # The busy pass asked to be woken again shortly (a pass that ran may also have published the
    # wake-up for the jobs its sibling still holds, due when their lease ends).
    busy = [
        countdown for step, _, countdown, _ in publisher.sent if step == Step.POLL_DUE and countdown < batch.settings.poll_lease_seconds
    ]
    assert len(busy) == 1 and tasks.BUSY_RETRY <= busy[0] < tasks.BUSY_RETRY + 0.5
    assert {load(i).state for i in ids} == {"succeeded"}

    # Every slot is handed back when the passes end: the next pass runs.
    late = new_job(prompt="late")
    tasks.submit_due.apply(throw=True)
    clock.advance(batch.settings.first_poll_delay)
    as_worker(tasks.poll_due)
    assert load(late).state == "succeeded"


def test_a_submitter_pass_with_its_node_slot_busy_publishes_a_wakeup_instead(batch, new_job, load, publisher, fake_provider):
    first, second = new_job(prompt="first"), new_job(prompt="second")
    batch.settings = batch.settings.model_copy(update={"submit_batch_size": 1, "submit_threads": 1})
    calls: list[int] = []

    def another_pass(_request):
        as_worker(tasks.submit_due)
        calls.append(fake_provider.calls["submit"])

    fake_provider.script("submit", another_pass)
    as_worker(tasks.submit_due)
    assert calls == [1]  # the second pass sent nothing while the first held the slot
    assert (Step.SUBMIT_DUE, None) in [(step, job_id) for step, job_id, _, _ in publisher.sent]
    assert {load(first).state, load(second).state} == {"processing"}  # the first pass went on to the second job


def test_passes_on_other_nodes_do_not_share_slots(batch, new_job, load, clock, fake_provider):
    batch.settings = batch.settings.model_copy(update={"poll_passes_per_node": 1, "poll_batch_size": 1})
    ids = [new_job(prompt=f"job {i}") for i in range(2)]
    tasks.submit_due.apply(throw=True)
    clock.advance(batch.settings.first_poll_delay)
    ran: list[bool] = []

    def pass_on_node_b(_request):
        before = fake_provider.calls["result"]
        as_worker(tasks.poll_due, hostname="node-b")
        ran.append(fake_provider.calls["result"] > before)

    fake_provider.script("result", pass_on_node_b)
    as_worker(tasks.poll_due, hostname="node-a")
    assert ran == [True]
    assert {load(i).state for i in ids} == {"succeeded"}


def test_a_failed_pass_is_dropped_and_its_slot_handed_back(batch, new_job, load, clock, publisher):
    batch.settings = batch.settings.model_copy(update={"poll_passes_per_node": 1})
    job_id = new_job()
    tasks.submit_due.apply(throw=True)
    publisher.sent.clear()
    clock.advance(batch.settings.first_poll_delay)
    sessions = batch.sessions

    def database_down():
        raise OperationalError("SELECT", {}, Exception("database unreachable"))

    batch.sessions = database_down
    as_worker(tasks.poll_due)  # no exception: claimed jobs come due again after their lease
    assert publisher.sent == []
    batch.sessions = sessions
    as_worker(tasks.poll_due)  # the slot was handed back
    assert load(job_id).state == "succeeded"


def test_a_pass_without_a_node_name_uses_the_host_name(batch, new_job, load, clock, fake_provider, publisher):
    batch.settings = batch.settings.model_copy(update={"poll_passes_per_node": 1})
    new_job()
    tasks.submit_due.apply(throw=True)
    clock.advance(batch.settings.first_poll_delay)
    publisher.sent.clear()

    def pass_on_this_host(_request):
        as_worker(tasks.poll_due, hostname=socket.gethostname())

    fake_provider.script("result", pass_on_this_host)
    as_worker(tasks.poll_due, hostname=None)
    assert [step for step, *_ in publisher.sent] == [Step.POLL_DUE]  # same node: busy


# --- worker hooks --------------------------------------------------------------------------------


@pytest.fixture
def wired_settings(settings):
    """Settings build_deps can wire without services (Redis connects lazily, on first use)."""
    return settings.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"})


def test_a_forked_child_gets_fresh_connections_deps_and_pools(wired_settings, publisher):
    settings = wired_settings
    tasks.use_deps(None)
    reset_deps()
    try:
        wired = build_deps(settings, publisher)
        assert tasks.task_deps() is wired  # the production wiring, once per process
        pool = get_engine(settings.database_url).pool
        threads = shared_pool("poll", 1)
        worker_process_init.send(sender=None)
        assert get_engine(settings.database_url).pool is not pool  # the parent's connections are not reused
        assert shared_pool("poll", 1) is not threads
        assert build_deps(settings, publisher) is not wired
    finally:
        reset_deps()


class Consumer:
    """What worker_ready sends: the worker's consumer, named after its node."""

    def __init__(self, hostname: str):
        self.hostname = hostname


def test_a_restarted_worker_clears_its_own_pass_locks_only(deps):
    node = Consumer("node-a")
    ttl = tasks.loop_lock_ttl(deps.settings)
    held = [pass_lock_name(loop, "node-a", 0) for loop in ("poller", "submitter")]
    other = pass_lock_name("poller", "node-b", 0)
    for key in [*held, other]:
        assert deps.fleet.once(key, ttl=ttl)
    worker_ready.send(sender=node)
    assert all(deps.fleet.once(key, ttl=ttl) for key in held)  # free again
    assert not deps.fleet.once(other, ttl=ttl)  # another node's lock is not ours to clear


def test_a_ready_worker_beats_its_heartbeat_until_it_shuts_down(deps):
    import threading
    import time

    worker_ready.send(sender=Consumer("w1@node-a"))
    deadline = time.monotonic() + 5
    while "w1@node-a" not in deps.fleet.workers_seen(60) and time.monotonic() < deadline:
        time.sleep(0.01)
    seen = deps.fleet.workers_seen(60)["w1@node-a"]
    assert seen["host"] == socket.gethostname() and seen["pid"] > 0
    worker_shutdown.send(sender=None)
    deadline = time.monotonic() + 5
    while any(t.name == "edit-worker-heartbeat" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "edit-worker-heartbeat" for t in threading.enumerate())


def test_worker_logs_carry_the_job_context():
    logger = logging.getLogger("edit-worker-test-hook")
    after_setup_logger.send(sender=None, logger=logger, loglevel=logging.INFO, logfile=None, format="", colorize=False)
    assert logger.handlers and all(isinstance(h.formatter, ContextFormatter) for h in logger.handlers)


def test_use_deps_none_restores_the_production_wiring(deps, wired_settings, publisher):
    settings = wired_settings
    assert tasks.task_deps() is deps
    tasks.use_deps(None)
    reset_deps()
    try:
        assert tasks.task_deps() is build_deps(settings, publisher)
    finally:
        reset_deps()
