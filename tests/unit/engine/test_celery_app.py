"""Specification of the Celery app's settings (worker/engine/celery_app.py), the ones DESIGN.md says
matter: late acks and redelivery of a lost worker's message, one message prefetched at a time, JSON
only, results ignored, a visibility timeout longer than any wait we schedule, and beat's schedule
per poll/submit mode."""

from __future__ import annotations

import pytest

from worker.core.steps import Step
from worker.engine import celery_app, tasks
from worker.engine.celery_app import MAX_COUNTDOWN, VISIBILITY_TIMEOUT, make_app
from worker.engine.publisher import QUEUE, RECONCILE_TASK, TASK_NAMES, CeleryPublisher


def configured(settings, **update):
    return make_app(settings.model_copy(update=update)).conf


def test_a_message_is_acked_after_its_step_ran_and_redelivered_if_the_worker_dies(settings):
    conf = configured(settings)
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    # A submit cut off by a lost broker connection has been paid for: let it finish.
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False


def test_a_worker_takes_one_message_at_a_time(settings):
    assert configured(settings).worker_prefetch_multiplier == 1


def test_messages_are_json_only_and_results_are_ignored(settings):
    conf = configured(settings)
    assert conf.task_serializer == "json" and conf.event_serializer == "json"
    assert list(conf.accept_content) == ["json"]  # no pickle: a message cannot run code
    assert conf.task_ignore_result is True and conf.result_backend is None


def test_the_broker_connection_is_retried_forever_including_at_start(settings):
    conf = configured(settings)
    assert conf.broker_connection_retry_on_startup is True
    assert conf.broker_connection_retry is True and conf.broker_connection_max_retries is None


def test_the_visibility_timeout_is_longer_than_every_wait_and_every_task(settings):
    conf = configured(settings)
    assert conf.broker_transport_options["visibility_timeout"] == VISIBILITY_TIMEOUT
    # A message waiting (countdown/ETA) or running past the visibility timeout is delivered twice.
    assert MAX_COUNTDOWN < VISIBILITY_TIMEOUT
    assert conf.task_soft_time_limit < conf.task_time_limit < VISIBILITY_TIMEOUT
    for entry in conf.beat_schedule.values():
        assert entry["schedule"].total_seconds() < VISIBILITY_TIMEOUT


def test_messages_go_to_the_worker_queue_and_times_are_utc(settings):
    conf = configured(settings)
    assert conf.task_default_queue == QUEUE
    assert conf.enable_utc is True and conf.timezone == "UTC"


def test_the_broker_is_the_configured_one(settings):
    app = make_app(settings.model_copy(update={"celery_broker_url": "redis://broker.example:6379/3"}))
    assert app.conf.broker_url == "redis://broker.example:6379/3"


@pytest.mark.parametrize(
    "poll_mode, submit_mode, entries",
    [
        ("task", "task", {"reconcile", "deliver-callbacks"}),
        ("batch", "task", {"reconcile", "deliver-callbacks", "poll-due"}),
        ("task", "batch", {"reconcile", "deliver-callbacks", "submit-due"}),
        ("batch", "batch", {"reconcile", "deliver-callbacks", "poll-due", "submit-due"}),
    ],
)
def test_beat_runs_the_reconciler_and_ticks_only_the_batch_loops_in_use(settings, poll_mode, submit_mode, entries):
    schedule = configured(settings, poll_mode=poll_mode, submit_mode=submit_mode, sweep_interval=7.0).beat_schedule
    assert set(schedule) == entries
    assert schedule["reconcile"]["task"] == RECONCILE_TASK
    assert schedule["reconcile"]["schedule"].total_seconds() == 7.0
    for name, step in (("poll-due", Step.POLL_DUE), ("submit-due", Step.SUBMIT_DUE)):
        if name in schedule:
            assert schedule[name]["task"] == TASK_NAMES[step]
    # A tick not run in time expires instead of piling up behind newer ones, but not before the next is due.
    for entry in schedule.values():
        assert entry["options"]["expires"] >= entry["schedule"].total_seconds()


def test_every_beat_entry_names_a_task_the_workers_run(settings):
    registered = set(tasks.app.tasks)
    schedule = configured(settings, poll_mode="batch", submit_mode="batch").beat_schedule
    assert {entry["task"] for entry in schedule.values()} <= registered


def test_the_workers_load_the_tasks_module(settings):
    assert "worker.engine.tasks" in make_app(settings).conf.include


def test_the_process_publisher_sends_on_the_process_app():
    publisher = celery_app.celery_publisher()
    assert isinstance(publisher, CeleryPublisher) and publisher.celery is celery_app.app
