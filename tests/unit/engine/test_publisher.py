"""Specification of steps as Celery messages (worker/engine/publisher.py): the task names the
publisher sends are the names the workers register, a per-job step carries its job id (and a poll
its poll_seq) and a loop step nothing, in arguments the registered task accepts; a countdown is
capped below the broker's visibility timeout; messages are JSON on the worker queue."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from kombu import Connection

from worker.core.steps import Step
from worker.engine import tasks
from worker.engine.celery_app import VISIBILITY_TIMEOUT, make_app
from worker.engine.publisher import MAX_COUNTDOWN, QUEUE, RECONCILE_TASK, TASK_NAMES, CeleryPublisher


class SentTasks:
    """A stand-in for the Celery app: records `send_task` calls."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], dict[str, Any]]] = []

    def send_task(self, name: str, args: list[Any], **options: Any) -> None:
        self.sent.append((name, args, options))


@pytest.fixture
def celery() -> SentTasks:
    return SentTasks()


def test_every_step_has_a_task_registered_under_the_publishers_name():
    registered = {name for name in tasks.app.tasks if not name.startswith("celery.")}
    assert registered == {TASK_NAMES[step] for step in Step} | {RECONCILE_TASK}
    assert len(set(TASK_NAMES.values())) == len(Step)


@pytest.mark.parametrize(
    "step, job_id, poll_seq, args",
    [
        (Step.SUBMIT, "job-1", None, ["job-1"]),
        (Step.POLL, "job-1", 4, ["job-1", 4]),
        (Step.UPLOAD, "job-1", None, ["job-1"]),
        (Step.SUBMIT_DUE, None, None, []),
        (Step.POLL_DUE, None, None, []),
    ],
)
def test_per_job_steps_carry_their_job_and_loop_steps_nothing(celery, step, job_id, poll_seq, args):
    CeleryPublisher(celery).publish(step, job_id, poll_seq=poll_seq)
    [(name, sent_args, options)] = celery.sent
    assert name == TASK_NAMES[step] and sent_args == args
    assert options["queue"] == QUEUE
    assert options["retry"] is True and options["retry_policy"]["max_retries"] >= 1


@pytest.mark.parametrize("step", list(Step))
def test_the_registered_task_accepts_what_the_publisher_sends(celery, step):
    CeleryPublisher(celery).publish(step, "job-1" if step.per_job else None, poll_seq=2 if step is Step.POLL else None)
    [(name, args, _)] = celery.sent
    inspect.signature(tasks.app.tasks[name].run).bind(*args)  # raises TypeError on a mismatch


@pytest.mark.parametrize(
    "countdown, expected",
    [(0.0, None), (-3.0, None), (2.5, 2.5), (MAX_COUNTDOWN, MAX_COUNTDOWN), (10 * VISIBILITY_TIMEOUT, MAX_COUNTDOWN)],
)
def test_a_countdown_is_capped_below_the_visibility_timeout(celery, countdown, expected):
    CeleryPublisher(celery).publish(Step.SUBMIT, "job-1", countdown=countdown)
    [(_, _, options)] = celery.sent
    assert options.get("countdown") == expected
    assert options.get("countdown", 0.0) < VISIBILITY_TIMEOUT


def test_a_step_name_as_a_string_is_accepted(celery):
    CeleryPublisher(celery).publish("upload", "job-1")
    assert celery.sent[0][:2] == (TASK_NAMES[Step.UPLOAD], ["job-1"])


def test_a_published_step_arrives_as_json_on_the_worker_queue_and_runs(settings, deps, new_job, load):
    """Through a real Celery app and kombu's in-memory broker: the message the worker would get."""
    app = make_app(settings.model_copy(update={"celery_broker_url": "memory://publisher-test"}))
    job_id = new_job()
    CeleryPublisher(app).publish(Step.SUBMIT, job_id, countdown=1.0)
    with Connection("memory://publisher-test") as connection:
        queue = connection.SimpleQueue(QUEUE)
        message = queue.get(timeout=5)
        message.ack()
        queue.close()
    assert message.content_type == "application/json"
    assert message.headers["task"] == TASK_NAMES[Step.SUBMIT] and message.headers["eta"] is not None
    args, kwargs, _embed = message.decode()
    assert (args, kwargs) == ([job_id], {})
    # The worker side: the task registered under that name runs the step.
    tasks.use_deps(lambda: deps)
    try:
        tasks.app.tasks[message.headers["task"]].apply(args=args, kwargs=kwargs, throw=True)
    finally:
        tasks.use_deps(None)
    assert load(job_id).state == "processing"
