"""Specification of what every step shares (worker/engine/bookkeeping.py): a job whose deadline
passed fails with deadline_exceeded in whatever state it waits (its provider task cancelled if it
was still running, its outputs kept if it was uploading) — unless it moved on meanwhile; failing a
job hands back its limiter slot; a provider or limiter outage while cancelling a task or handing
back slots is logged, not raised."""

from __future__ import annotations

import httpx
import redis

from worker.adapters.limiter import MemoryLimiter
from worker.core.jobs import job_events
from worker.core.states import State
from worker.engine import bookkeeping
from worker.engine.copier import run_upload
from worker.engine.poller import run_poll
from worker.engine.submit import run_submit

# --- deadlines, through the steps ----------------------------------------------------------------


def test_a_job_whose_deadline_passed_while_queued_fails_without_calling_the_provider(deps, new_job, load, fake_provider, clock):
    job_id = new_job(deadline_seconds=60)
    clock.advance(61)
    assert run_submit(deps, job_id) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert fake_provider.calls["submit"] == 0


def test_a_job_whose_deadline_passed_while_processing_fails_and_its_task_is_cancelled(deps, new_job, load, fake_provider, clock, submitted):
    fake_provider.auto_outcome = None  # never finishes
    job_id = new_job(deadline_seconds=60)
    first = submitted(deps, job_id)
    clock.advance(61)
    assert run_poll(deps, job_id, first.poll_seq) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert fake_provider.cancelled == [job.prediction_id]


def test_a_job_whose_deadline_passed_while_uploading_fails_but_keeps_the_provider_outputs(
    deps, new_job, load, fake_provider, clock, submitted
):
    job_id = new_job(deadline_seconds=60)
    first = submitted(deps, job_id)
    assert run_poll(deps, job_id, first.poll_seq).step == "upload"
    clock.advance(61)
    assert run_upload(deps, job_id) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert job.provider_outputs  # `retry` can still copy them


# --- the pieces ---------------------------------------------------------------------------------


def test_a_job_is_past_its_deadline_from_the_deadline_on(deps, new_job, load, clock):
    job = load(new_job(deadline_seconds=60))
    clock.advance(59.9)
    assert not bookkeeping.past_deadline(deps, job)
    clock.advance(0.1)
    assert bookkeeping.past_deadline(deps, job)


def test_fail_deadline_names_the_prediction_and_cancels_it(deps, new_job, load, fake_provider, submitted):
    fake_provider.auto_outcome = None
    job_id = new_job()
    submitted(deps, job_id)
    prediction_id = load(job_id).prediction_id
    assert bookkeeping.fail_deadline(deps, job_id, State.PROCESSING, prediction_id)
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert prediction_id in job.error_message
    assert fake_provider.cancelled == [prediction_id]


def test_fail_deadline_leaves_a_job_that_moved_on_alone(deps, new_job, load, fake_provider, submitted):
    fake_provider.auto_outcome = None
    job_id = new_job()
    submitted(deps, job_id)  # processing now, not queued
    prediction_id = load(job_id).prediction_id
    assert not bookkeeping.fail_deadline(deps, job_id, State.QUEUED, prediction_id)
    assert load(job_id).state == "processing"
    assert fake_provider.cancelled == []


def test_fail_job_records_the_code_and_message_and_hands_back_the_slot(deps, new_job, load, clock):
    deps.limiter.max_concurrency = 1
    job_id = new_job()
    assert deps.limiter.acquire(job_id).go
    assert not deps.limiter.acquire("another job").go  # the job holds the only slot
    bookkeeping.fail_job(deps, job_id, State.QUEUED, "the input was refused", "c" * 80, "prompt too long")
    job = load(job_id)
    assert (job.state, job.error_code, job.error_message) == ("failed", "c" * 64, "prompt too long")
    assert job.finished_at == clock.now()
    assert job_events(deps.sessions, job_id)[-1].reason == "the input was refused"
    assert deps.limiter.acquire("another job").go


def test_fail_job_does_not_move_a_job_that_is_not_in_the_expected_state(deps, new_job, load):
    job_id = new_job()
    bookkeeping.fail_job(deps, job_id, State.PROCESSING, "too late", "x", "gone")
    assert load(job_id).state == "queued"


def test_cancel_at_provider_reports_a_provider_error_instead_of_raising(deps, fake_provider, caplog):
    task = fake_provider.create_task({"prompt": "p"})
    fake_provider.script("cancel", httpx.Response(500, json={"code": 500, "message": "oops"}))
    assert bookkeeping.cancel_at_provider(deps, task.id) is False
    assert "provider cancel of " + task.id + " failed" in caplog.text
    assert bookkeeping.cancel_at_provider(deps, task.id) is True
    assert fake_provider.cancelled == [task.id]


class LimiterDown(MemoryLimiter):
    calls = 0

    def release_many(self, tokens: list[str]) -> None:
        self.calls += 1
        raise redis.ConnectionError("redis unreachable")


def test_release_slots_logs_a_limiter_outage_instead_of_raising(deps, clock, caplog):
    deps.limiter = LimiterDown(clock=clock.monotonic)
    bookkeeping.release_slots(deps, [])
    assert deps.limiter.calls == 0  # nothing to hand back: no Redis call
    bookkeeping.release_slots(deps, ["job-a", "job-b"])
    assert deps.limiter.calls == 1  # one call for the lot
    assert "could not release 2 limiter slot(s)" in caplog.text


def test_release_slots_hands_back_every_slot_in_one_call(deps):
    deps.limiter.max_concurrency = 2
    assert deps.limiter.acquire("job-a").go and deps.limiter.acquire("job-b").go
    assert not deps.limiter.acquire("job-c").go
    bookkeeping.release_slots(deps, ["job-a", "job-b"])
    assert deps.limiter.acquire("job-c").go and deps.limiter.acquire("job-d").go


def test_a_log_context_names_the_job_and_never_its_payload(deps, new_job, load):
    job = load(new_job())
    context = bookkeeping.job_context(job, step="poll")
    assert context == {
        "job_id": job.id,
        "tenant": "default",
        "state": "queued",
        "prediction_id": None,
        "attempt": 0,
        "trace_parent": None,
        "step": "poll",
    }
