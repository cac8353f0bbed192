"""Specification of the poller (worker/engine/poller.py): one poll of a job in task mode (reschedule,
finish, fail, a stale poll_seq is a no-op), and the batch poller (poll_mode=batch): claims due jobs
by next_poll_at, never two pollers on one job, none forgotten after a poller dies, backoff
honoured, uploads scheduled on completion."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest

from worker.core import jobs
from worker.core.codes import ErrorCode
from worker.core.steps import Step
from worker.engine import copier, poller, submit
from worker.engine.copier import run_upload
from worker.engine.poller import run_poll

BUCKET, PREFIX = "edit-worker-unit", "edits"  # as in conftest.py


@pytest.fixture
def batch_deps(deps):
    deps.settings = deps.settings.model_copy(update={"poll_mode": "batch", "poll_batch_size": 50, "poll_threads": 4})
    return deps


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def _processing(batch_deps, new_job, n: int, **kw) -> list[str]:
    """n jobs submitted for real (through run_submit), so each has a provider task."""
    ids = []
    for i in range(n):
        job_id = new_job(prompt=f"batch job {i}", **kw)
        submit.run_submit(batch_deps, job_id)
        ids.append(job_id)
    return ids


# --- one poll (task mode) ------------------------------------------------------------------


def test_a_poll_before_completion_reschedules_at_least_two_seconds_later_and_bumps_poll_seq(
    deps, new_job, load, fake_provider, clock, submitted
):
    fake_provider.polls_to_complete = 3
    job_id = new_job()
    first = submitted(deps, job_id)
    clock.advance(first.countdown)
    nxt = run_poll(deps, job_id, first.poll_seq)
    assert nxt.step == "poll"
    assert nxt.countdown >= 2.0
    assert nxt.poll_seq == first.poll_seq + 1
    job = load(job_id)
    assert job.state == "processing" and job.poll_seq == nxt.poll_seq
    assert job.next_poll_at == clock.now() + timedelta(seconds=nxt.countdown)


def test_a_poll_with_a_stale_poll_seq_is_a_no_op(deps, new_job, load, fake_provider, clock, submitted):
    fake_provider.polls_to_complete = 5
    job_id = new_job()
    first = submitted(deps, job_id)
    second = run_poll(deps, job_id, first.poll_seq)
    calls = fake_provider.calls["result"]
    assert run_poll(deps, job_id, first.poll_seq) is None  # the old chain dies
    assert fake_provider.calls["result"] == calls  # without asking the provider
    assert load(job_id).poll_seq == second.poll_seq


def test_a_poll_of_a_job_that_is_not_processing_is_a_no_op(deps, new_job, fake_provider):
    job_id = new_job()
    assert run_poll(deps, job_id, 0) is None
    assert run_upload(deps, job_id) is None
    assert fake_provider.calls["result"] == 0


def test_a_transient_poll_error_reschedules_without_failing(deps, new_job, load, fake_provider, clock, submitted):
    job_id = new_job()
    first = submitted(deps, job_id)
    fake_provider.script("result", httpx.Response(503, json={"code": 503, "message": "busy"}))
    nxt = run_poll(deps, job_id, first.poll_seq)
    assert nxt.step == "poll" and nxt.countdown >= 2.0 and nxt.poll_seq == first.poll_seq + 1
    assert load(job_id).state == "processing"


def test_a_poll_auth_error_trips_the_breaker_and_keeps_polling_later(
    deps, new_job, load, fake_provider, breaker, journal, limiter, submitted
):
    job_id = new_job()
    first = submitted(deps, job_id)
    fake_provider.script("result", httpx.Response(401, json={"code": 401, "message": "bad key"}))
    nxt = run_poll(deps, job_id, first.poll_seq)
    assert breaker.state()["open"]
    assert nxt.step == "poll" and nxt.countdown >= deps.settings.breaker_open_seconds
    assert load(job_id).state == "processing"
    # While the breaker is open, polls of other jobs wait too, without calling the provider.
    other = new_job(prompt="other")
    breaker.reset()
    other_first = submitted(deps, other)
    breaker.trip(60, "test")
    calls = fake_provider.calls["result"]
    assert run_poll(deps, other, other_first.poll_seq).countdown >= 60
    assert fake_provider.calls["result"] == calls


def test_a_task_that_failed_at_the_provider_fails_the_job_with_its_error(deps, new_job, drive, load, fake_provider):
    fake_provider.auto_outcome = "failed"
    fake_provider.auto_error = "input image violates the content policy"
    job_id = new_job()
    ran = drive(job_id)
    assert [n.step for n in ran] == ["submit", "poll"]
    job = load(job_id)
    assert job.state == "failed"
    assert job.error_code == "task_failed"
    assert job.error_message == "input image violates the content policy"
    assert job.finished_at is not None


def test_a_completed_task_without_outputs_fails_the_job(deps, new_job, load, fake_provider, submitted):
    fake_provider.outputs_per_task = 0
    job_id = new_job()
    first = submitted(deps, job_id)
    assert run_poll(deps, job_id, first.poll_seq) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "no_outputs")


# --- the batch poller ----------------------------------------------------------------------


def test_nothing_is_polled_before_it_is_due(batch_deps, new_job, fake_provider, executor):
    _processing(batch_deps, new_job, 3)
    report = poller.poll_due(batch_deps, executor=executor)
    assert report.claimed == 0
    assert fake_provider.calls["result"] == 0
    assert report.next_due_in == pytest.approx(batch_deps.settings.first_poll_delay, abs=0.01)


def test_due_jobs_are_copied_to_s3_by_the_poller_itself(batch_deps, new_job, fake_provider, clock, load, executor, list_keys, sessions):
    ids = _processing(batch_deps, new_job, 5)
    clock.advance(batch_deps.settings.first_poll_delay)
    report = poller.poll_due(batch_deps, executor=executor)
    assert report.claimed == 5 and report.finished == 5
    assert report.uploads == []  # no upload message: done inline
    assert {load(i).state for i in ids} == {"succeeded"}
    assert sorted(list_keys()) == sorted(f"{PREFIX}/{i}/0.png" for i in ids)
    for job_id in ids:
        job = load(job_id)
        assert job.outputs == [f"s3://{BUCKET}/{PREFIX}/{job_id}/0.png"] and job.provider_outputs is None
        assert [(e.from_state, e.to_state) for e in jobs.job_events(sessions, job_id)][-2:] == [
            ("processing", "uploading"),
            ("uploading", "succeeded"),
        ]
    assert fake_provider.calls["result"] == 5 and fake_provider.calls["download"] == 5
    assert batch_deps.limiter.slots_held() == 0  # every provider slot handed back
    assert report.next_due_in is None


def test_a_failed_inline_copy_leaves_the_job_uploading_for_an_upload_task(batch_deps, new_job, fake_provider, clock, load, executor):
    ids = _processing(batch_deps, new_job, 2)
    fake_provider.script("download", httpx.Response(503, text="<html>busy</html>"))
    clock.advance(batch_deps.settings.first_poll_delay)
    report = poller.poll_due(batch_deps, executor=executor)
    assert report.finished == 2
    assert len(report.uploads) == 1 and report.uploads[0].step == Step.UPLOAD and report.uploads[0].countdown > 0
    failed = report.uploads[0].job_id
    assert load(failed).state == "uploading" and load(failed).provider_outputs
    assert {load(i).state for i in ids if i != failed} == {"succeeded"}
    copier.run_upload(batch_deps, failed)  # what the upload task does
    assert load(failed).state == "succeeded"


def test_the_first_poll_learns_the_models_typical_inference_time(batch_deps, new_job, clock, executor, load):
    batch_deps.settings = batch_deps.settings.model_copy(update={"first_poll_delay": 0.5})
    _processing(batch_deps, new_job, 3)
    clock.advance(0.5)
    poller.poll_due(batch_deps, executor=executor)  # the fake provider reports 1234 ms of inference
    assert batch_deps.fleet.typical_inference() == pytest.approx(1.234)
    later = new_job(prompt="after learning")
    nxt = submit.run_submit(batch_deps, later)
    assert (load(later).next_poll_at - clock.now()).total_seconds() == pytest.approx(1.234, abs=0.01)
    assert nxt is None or nxt.countdown >= 1.234
    off = batch_deps.settings.model_copy(update={"adaptive_first_poll": False})
    batch_deps.settings = off
    assert submit.first_poll_delay(batch_deps) == 0.5


def test_due_jobs_complete_and_uploads_are_scheduled_when_not_inline(batch_deps, new_job, fake_provider, clock, load, executor):
    batch_deps.settings = batch_deps.settings.model_copy(update={"upload_inline": False})
    ids = _processing(batch_deps, new_job, 5)
    clock.advance(batch_deps.settings.first_poll_delay)
    report = poller.poll_due(batch_deps, executor=executor)
    assert report.claimed == 5 and report.finished == 5
    assert sorted(n.job_id for n in report.uploads) == sorted(ids)
    assert all(n.step == Step.UPLOAD for n in report.uploads)
    assert {load(i).state for i in ids} == {"uploading"}
    assert fake_provider.calls["result"] == 5
    assert report.next_due_in is None  # nothing left processing


def test_running_jobs_are_rescheduled_at_least_the_poll_interval_later(batch_deps, new_job, fake_provider, clock, load, executor):
    fake_provider.polls_to_complete = 3
    ids = _processing(batch_deps, new_job, 4)
    clock.advance(batch_deps.settings.first_poll_delay)
    before = clock.now()
    report = poller.poll_due(batch_deps, executor=executor)
    assert report.rescheduled == 4
    for job_id in ids:
        row = load(job_id)
        assert row.state == "processing"
        wait = (row.next_poll_at - before).total_seconds()
        s = batch_deps.settings
        assert s.poll_interval <= wait <= s.poll_interval + s.poll_jitter
    # Not due again yet: a second pass right away polls nothing.
    assert poller.poll_due(batch_deps, executor=executor).claimed == 0
    assert fake_provider.calls["result"] == 4


def test_retry_after_is_honoured_when_a_poll_fails(batch_deps, new_job, fake_provider, clock, load, executor):
    [job_id] = _processing(batch_deps, new_job, 1)
    fake_provider.script("result", httpx.Response(429, headers={"Retry-After": "17"}, json={"code": 429, "message": "slow down"}))
    clock.advance(batch_deps.settings.first_poll_delay)
    before = clock.now()
    poller.poll_due(batch_deps, executor=executor)
    row = load(job_id)
    assert row.state == "processing"
    assert (row.next_poll_at - before).total_seconds() >= 17


def test_a_claimed_job_is_not_claimed_again_until_its_lease_passes(batch_deps, new_job, clock, load):
    ids = _processing(batch_deps, new_job, 3)
    clock.advance(batch_deps.settings.first_poll_delay)
    first = poller.claim_due(batch_deps, 10)
    assert sorted(t.job_id for t, _ in first) == sorted(ids)
    # The poller "dies" here: nothing is applied. Another poller finds nothing due...
    assert poller.claim_due(batch_deps, 10) == []
    # ...until the lease passes; then the jobs are claimed again with a newer poll_seq.
    clock.advance(batch_deps.settings.poll_lease_seconds)
    second = poller.claim_due(batch_deps, 10)
    assert sorted(t.job_id for t, _ in second) == sorted(ids)
    assert all(
        b.seq == a.seq + 1 for (a, _), (b, _) in zip(sorted(first, key=lambda x: x[0].job_id), sorted(second, key=lambda x: x[0].job_id))
    )


def test_a_stale_pollers_outcome_is_discarded(batch_deps, new_job, clock, load, fake_provider):
    [job_id] = _processing(batch_deps, new_job, 1)
    clock.advance(batch_deps.settings.first_poll_delay)
    [(stale, _)] = poller.claim_due(batch_deps, 10)
    clock.advance(batch_deps.settings.poll_lease_seconds)
    [(fresh, _)] = poller.claim_due(batch_deps, 10)
    # The first poller comes back late with "completed": its CAS on poll_seq fails.
    decision = poller.fetch_and_decide(batch_deps, stale.prediction_id)
    assert isinstance(decision, poller.Finish)
    assert poller.apply_decision(batch_deps, stale, decision, chain=False) is None
    assert load(job_id).state == "processing"
    assert poller.apply_decision(batch_deps, fresh, decision, chain=False).step == Step.UPLOAD
    assert load(job_id).state == "uploading"


def test_concurrent_pollers_claim_disjoint_sets_and_forget_none(batch_deps, new_job, clock):
    ids = _processing(batch_deps, new_job, 60)
    clock.advance(batch_deps.settings.first_poll_delay)
    claimed: list[str] = []
    lock = threading.Lock()

    def one_poller():
        while True:
            got = poller.claim_due(batch_deps, 7)
            if not got:
                return
            with lock:
                claimed.extend(t.job_id for t, _ in got)

    threads = [threading.Thread(target=one_poller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == sorted(ids), "every due job claimed exactly once"


def test_past_deadline_jobs_fail_in_the_batch(batch_deps, new_job, clock, load, fake_provider, executor):
    [job_id] = _processing(batch_deps, new_job, 1, deadline_seconds=5)
    clock.advance(6)
    report = poller.poll_due(batch_deps, executor=executor)
    assert report.failed == 1
    row = load(job_id)
    assert row.state == "failed" and row.error_code == ErrorCode.DEADLINE.value
    assert fake_provider.cancelled == [row.prediction_id]


def test_an_open_breaker_pauses_polls_without_calling_the_provider(batch_deps, new_job, clock, fake_provider, load, executor):
    ids = _processing(batch_deps, new_job, 3)
    clock.advance(batch_deps.settings.first_poll_delay)
    batch_deps.breaker.trip(20, "test outage")
    report = poller.poll_due(batch_deps, executor=executor)
    assert report.rescheduled == 3
    assert fake_provider.calls["result"] == 0
    assert all((load(i).next_poll_at - clock.now()).total_seconds() >= 20 for i in ids)


def test_a_webhook_nudged_poll_in_batch_mode_copies_the_outputs_at_once_without_an_upload_message(
    batch_deps, new_job, clock, load, list_keys
):
    [job_id] = _processing(batch_deps, new_job, 1)
    clock.advance(batch_deps.settings.first_poll_delay)
    with batch_deps.sessions() as session:  # what the webhook's nudge does: take the poll over
        seq = jobs.take_over_poll(session, job_id, load(job_id).poll_seq, clock=clock.now)
        session.commit()
    assert run_poll(batch_deps, job_id, seq) is None  # nothing left to schedule: copied in this task
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"{PREFIX}/{job_id}/0.png"]
    assert batch_deps.limiter.slots_held() == 0
