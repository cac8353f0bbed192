"""Specification of what an operator does to a job (worker/engine/operator.py): cancel it (and its
provider task, even one only the journal knows), and replay a failed one from the furthest step
already paid for (copy again, poll the same task again, or submit again)."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from models import Outbox
from worker.core.jobs import transition
from worker.core.states import State
from worker.engine.operator import cancel_job, retry_job
from worker.engine.poller import run_poll
from worker.engine.submit import run_submit
from worker.errors import InvalidJobOperation

# --- cancel --------------------------------------------------------------------------------------


def test_cancelling_a_processing_job_cancels_the_provider_task_and_is_terminal(deps, new_job, load, fake_provider, clock, submitted):
    fake_provider.auto_outcome = None
    job_id = new_job()
    first = submitted(deps, job_id)
    job = cancel_job(deps, job_id)
    assert job.state == "cancelled" and job.finished_at == clock.now()
    assert fake_provider.cancelled == [job.prediction_id]
    [delete] = fake_provider.requests_to("cancel")
    assert delete.method == "DELETE" and delete.url.path == f"/api/v3/predictions/{job.prediction_id}"
    # Terminal: later messages are no-ops, and cancelling again changes nothing.
    assert run_poll(deps, job_id, first.poll_seq) is None
    assert cancel_job(deps, job_id).state == "cancelled"
    assert len(fake_provider.cancelled) == 1


def test_cancelling_a_job_whose_submit_answered_but_never_committed_cancels_the_journaled_task(deps, new_job, load, fake_provider):
    fake_provider.auto_outcome = None
    job_id = new_job()
    with deps.sessions() as session:  # the worker moved it to submitting, sent it, journaled the id ...
        transition(session, job_id, State.QUEUED, State.SUBMITTING, "submit attempt 1", clock=deps.clock, attempts=1)
        session.commit()
    task = fake_provider.create_task({"prompt": "make the sky purple"}, via_submit=True)
    deps.journal.remember(job_id, task.id)  # ... and died before its commit
    job = cancel_job(deps, job_id)
    assert job.state == "cancelled" and job.prediction_id == task.id
    assert fake_provider.cancelled == [task.id]


def test_cancelling_a_queued_job_does_not_call_the_provider(deps, new_job, fake_provider):
    job_id = new_job()
    assert cancel_job(deps, job_id).state == "cancelled"
    assert fake_provider.requests == []
    assert run_submit(deps, job_id) is None
    assert fake_provider.calls["submit"] == 0


def test_a_finished_job_cannot_be_cancelled(deps, new_job, drive):
    job_id = new_job()
    drive(job_id)
    with pytest.raises(InvalidJobOperation):
        cancel_job(deps, job_id)


def test_a_provider_error_on_cancel_still_cancels_the_job(deps, new_job, fake_provider, submitted):
    fake_provider.auto_outcome = None
    job_id = new_job()
    submitted(deps, job_id)
    fake_provider.script("cancel", httpx.Response(500, json={"code": 500, "message": "oops"}))
    assert cancel_job(deps, job_id).state == "cancelled"


# --- retry (the dead-letter replay) --------------------------------------------------------------


def outbox_steps(sessions, job_id) -> list[str]:
    with sessions() as s:
        return [o.task for o in s.scalars(select(Outbox).where(Outbox.job_id == job_id).order_by(Outbox.id))]


def test_retry_of_a_job_whose_task_failed_submits_again(deps, new_job, drive, load, fake_provider, sessions, states):
    fake_provider.auto_outcome = "failed"
    job_id = new_job()
    drive(job_id)
    first_prediction = load(job_id).prediction_id
    assert load(job_id).state == "failed"

    job = retry_job(deps, job_id)
    assert job.state == "queued"
    assert job.prediction_id is None
    assert outbox_steps(sessions, job_id) == ["submit", "submit"]

    fake_provider.auto_outcome = "completed"
    drive(job_id)
    job = load(job_id)
    assert job.state == "succeeded" and job.prediction_id != first_prediction
    assert len(fake_provider.submissions) == 2
    assert states(sessions, job_id)[-6:] == ["failed", "queued", "submitting", "processing", "uploading", "succeeded"]


def test_retry_of_a_job_that_ran_out_of_time_while_processing_polls_the_same_task_again(
    deps, new_job, load, fake_provider, clock, sessions, submitted
):
    fake_provider.auto_outcome = None
    job_id = new_job(deadline_seconds=60)
    first = submitted(deps, job_id)
    clock.advance(61)
    run_poll(deps, job_id, first.poll_seq)
    failed = load(job_id)
    assert failed.error_code == "deadline_exceeded"

    job = retry_job(deps, job_id)
    assert job.state == "processing" and job.prediction_id == failed.prediction_id
    assert job.poll_seq == failed.poll_seq + 1
    assert job.deadline_at > clock.now()
    assert outbox_steps(sessions, job_id)[-1] == "poll"
    assert len(fake_provider.submissions) == 1


@pytest.mark.parametrize("finish", ["queued", "succeeded", "cancelled"])
def test_only_failed_jobs_can_be_retried(deps, new_job, drive, finish):
    job_id = new_job()
    if finish == "succeeded":
        drive(job_id)
    elif finish == "cancelled":
        cancel_job(deps, job_id)
    with pytest.raises(InvalidJobOperation):
        retry_job(deps, job_id)
