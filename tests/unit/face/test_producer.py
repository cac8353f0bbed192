"""Specification of the producer side (worker/producer.py): what publishing just-created jobs sends
to the workers."""

from __future__ import annotations

import pytest

from worker.core import jobs
from worker.core.steps import Step
from worker.producer import publish_new


@pytest.fixture
def sub_deps(deps):
    deps.settings = deps.settings.model_copy(update={"poll_mode": "batch", "submit_mode": "batch"})
    return deps


def _queued(new_job, n: int) -> list[str]:
    return [new_job(prompt=f"queued job {i}") for i in range(n)]


def test_producers_publish_one_wakeup_per_batch_not_one_message_per_job(sub_deps, new_job, sessions, publisher):
    ids = _queued(new_job, 25)
    publish_new(sub_deps.settings, ids, publisher=publisher)
    assert publisher.sent == [(Step.SUBMIT_DUE, None, 0.0, None)]
    assert jobs.pending_outbox(sessions) == []  # every submit row counts as published


def test_in_task_mode_each_new_job_gets_its_own_submit_message(deps, new_job, sessions, publisher):
    ids = _queued(new_job, 3)
    publish_new(deps.settings, ids, publisher=publisher)
    assert publisher.sent == [(Step.SUBMIT, job_id, 0.0, None) for job_id in ids]
    assert jobs.pending_outbox(sessions) == []


def test_a_broker_outage_leaves_the_rows_unsent_for_the_relay(deps, new_job, sessions):
    class BrokerDown:
        def publish(self, *args, **kwargs):
            raise ConnectionError("broker unreachable")

    ids = _queued(new_job, 2)
    publish_new(deps.settings, ids, publisher=BrokerDown())  # does not raise: the jobs are safely queued
    assert sorted(row.job_id for row in jobs.pending_outbox(sessions)) == sorted(ids)
