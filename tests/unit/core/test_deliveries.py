"""Specification of callback deliveries as records: every terminal transition of a job with a
callback_url writes exactly one delivery row in the transition's own transaction (both transition
paths); a job without one, a non-terminal move or a lost compare-and-set writes none."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from models import Job
from worker.core import jobs
from worker.core.deliveries import callbacks_queued, delivery_json, list_deliveries
from worker.core.states import State

HOOK = "https://producer.example.com/hooks/edits"


def with_callback(sessions, job_id: str, url: str = HOOK) -> str:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(callback_url=url))
        session.commit()
    return job_id


def move(sessions, job_id: str, src: State, dst: State, clock, **fields) -> tuple[bool, bool]:
    """One `transition` in its own session: (moved, callbacks_queued)."""
    with sessions() as session:
        moved = jobs.transition(session, job_id, src, dst, "test", clock=clock.now, **fields)
        session.commit()
        return moved, callbacks_queued(session)


@pytest.mark.parametrize("dst", [State.FAILED, State.CANCELLED])
def test_a_terminal_transition_queues_one_delivery_for_a_job_with_a_callback_url(sessions, new_job, clock, dst):
    job_id = with_callback(sessions, new_job())
    assert move(sessions, job_id, State.QUEUED, dst, clock) == (True, True)
    [delivery] = list_deliveries(sessions, job_id)
    assert (delivery.state, delivery.status, delivery.url, delivery.attempts) == (dst.value, "pending", HOOK, 0)
    assert delivery.next_attempt_at == clock.now() and delivery.created_at == clock.now()
    assert delivery.webhook_id.startswith("msg_")


def test_no_delivery_without_a_callback_url_or_for_a_non_terminal_move(sessions, new_job, clock):
    plain = new_job()
    assert move(sessions, plain, State.QUEUED, State.FAILED, clock) == (True, False)
    assert list_deliveries(sessions, plain) == []
    hooked = with_callback(sessions, new_job())
    assert move(sessions, hooked, State.QUEUED, State.SUBMITTING, clock) == (True, False)
    assert list_deliveries(sessions, hooked) == []


def test_a_lost_compare_and_set_queues_nothing(sessions, new_job, clock):
    job_id = with_callback(sessions, new_job())
    assert move(sessions, job_id, State.QUEUED, State.CANCELLED, clock) == (True, True)
    assert move(sessions, job_id, State.QUEUED, State.FAILED, clock) == (False, False)  # stale: already cancelled
    assert len(list_deliveries(sessions, job_id)) == 1


def test_a_rolled_back_transition_leaves_no_delivery(sessions, new_job, clock):
    job_id = with_callback(sessions, new_job())
    with sessions() as session:
        assert jobs.transition(session, job_id, State.QUEUED, State.FAILED, "test", clock=clock.now)
        session.rollback()
    assert list_deliveries(sessions, job_id) == []
    assert jobs.get_job(sessions, job_id).state == "queued"


def test_transition_now_queues_the_delivery_and_answers_the_callback_url(sessions, new_job, clock):
    job_id = with_callback(sessions, new_job())
    for src, dst in ((State.QUEUED, State.SUBMITTING), (State.SUBMITTING, State.PROCESSING), (State.PROCESSING, State.UPLOADING)):
        row = jobs.transition_now(sessions, job_id, src, dst, "test", clock=clock.now)
        assert row is not None and tuple(row._fields) == ("id",)  # non-terminal: the shape asked for
    row = jobs.transition_now(sessions, job_id, State.UPLOADING, State.SUCCEEDED, "done", clock=clock.now, outputs=["s3://b/k"])
    assert row.callback_url == HOOK
    [delivery] = list_deliveries(sessions, job_id)
    assert delivery.state == "succeeded"
    assert jobs.transition_now(sessions, job_id, State.UPLOADING, State.SUCCEEDED, "again", clock=clock.now) is None
    assert len(list_deliveries(sessions, job_id)) == 1


def test_each_terminal_transition_of_a_retried_job_gets_its_own_delivery(sessions, new_job, clock):
    job_id = with_callback(sessions, new_job())
    move(sessions, job_id, State.QUEUED, State.FAILED, clock)
    move(sessions, job_id, State.FAILED, State.QUEUED, clock)  # what `retry` does
    move(sessions, job_id, State.QUEUED, State.CANCELLED, clock)
    first, second = list_deliveries(sessions, job_id)
    assert (first.state, second.state) == ("failed", "cancelled")
    assert first.webhook_id != second.webhook_id


def test_delivery_json_shows_no_payload(sessions, new_job, clock):
    job_id = with_callback(sessions, new_job())
    move(sessions, job_id, State.QUEUED, State.FAILED, clock)
    [delivery] = list_deliveries(sessions, job_id)
    data = delivery_json(delivery)
    assert data["event"] == "failed" and data["status"] == "pending" and data["job_id"] == job_id
    assert "payload" not in data
