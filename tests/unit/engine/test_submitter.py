"""The batch submitter (submit_mode=batch): leases due queued jobs, takes limiter slots in one call,
submits each exactly once, hands back what it cannot send, and wakes the poller once per batch."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from worker.adapters.limiter import MemoryLimiter
from worker.core import jobs
from worker.core.steps import Step
from worker.engine import poller, submitter


@pytest.fixture
def sub_deps(deps):
    deps.settings = deps.settings.model_copy(
        update={
            "poll_mode": "batch",
            "submit_mode": "batch",
            "submit_batch_size": 50,
            "submit_threads": 4,
            "submit_backpressure_seconds": 0.0,
        }
    )
    return deps


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def _queued(new_job, n: int) -> list[str]:
    return [new_job(prompt=f"queued job {i}") for i in range(n)]


def _path(sessions, job_id: str) -> list[tuple[str | None, str]]:
    return [(e.from_state, e.to_state) for e in jobs.job_events(sessions, job_id)]


def test_a_pass_submits_every_due_job_exactly_once_and_wakes_the_poller_once(sub_deps, new_job, fake_provider, load, sessions, executor):
    ids = _queued(new_job, 7)
    report = submitter.submit_due(sub_deps, executor=executor)
    assert (report.leased, report.started, report.accepted, report.lost) == (7, 7, 7, 0)
    assert len(fake_provider.submissions) == 7
    assert sorted(t.body["prompt"] for t in fake_provider.submissions) == sorted(f"queued job {i}" for i in range(7))
    for job_id in ids:
        job = load(job_id)
        assert job.state == "processing" and job.prediction_id and job.attempts == 1
        assert _path(sessions, job_id) == [(None, "queued"), ("queued", "submitting"), ("submitting", "processing")]
        assert sub_deps.journal.recall(job_id) == job.prediction_id  # journaled
    # The poller was woken for the batch at once, in time for the first job's first poll.
    assert [(step, countdown) for step, _, countdown, _ in sub_deps.publisher.sent if step == Step.POLL_DUE] == [
        (Step.POLL_DUE, pytest.approx(sub_deps.settings.first_poll_delay, abs=0.5))
    ]
    assert report.schedule == []
    assert report.next_due_in is None  # nothing left queued
    # A second pass finds nothing: no job is sent twice.
    again = submitter.submit_due(sub_deps, executor=executor)
    assert again.leased == 0 and len(fake_provider.submissions) == 7


def test_jobs_beyond_the_rate_limit_wait_in_queued_without_spending_an_attempt(sub_deps, new_job, fake_provider, load, clock, executor):
    sub_deps.limiter = MemoryLimiter(rate_per_minute=3, clock=clock.monotonic)
    ids = _queued(new_job, 5)
    report = submitter.submit_due(sub_deps, executor=executor)
    assert report.started == 3 and len(fake_provider.submissions) == 3
    waiting = [load(i) for i in ids if load(i).state == "queued"]
    assert len(waiting) == 2 and all(j.attempts == 0 for j in waiting)
    assert report.next_due_in == pytest.approx(60.0, abs=0.5)  # the rate window
    clock.advance(61)
    later = submitter.submit_due(sub_deps, executor=executor)
    assert later.started == 2 and {load(i).state for i in ids} == {"processing"}
    assert len(fake_provider.submissions) == 5


def test_an_open_breaker_leases_nothing_and_a_half_open_one_lets_exactly_one_probe_through(
    sub_deps, new_job, fake_provider, load, clock, executor
):
    ids = _queued(new_job, 4)
    sub_deps.breaker.trip(30, "provider unavailable")
    report = submitter.submit_due(sub_deps, executor=executor)
    assert report.leased == 0 and fake_provider.calls["submit"] == 0
    assert report.next_due_in == pytest.approx(30.0, abs=0.1)
    clock.advance(31)
    probe = submitter.submit_due(sub_deps, executor=executor)
    assert probe.started == 1 and len(fake_provider.submissions) == 1
    assert not sub_deps.breaker.state()["tripped"]  # the probe went through: closed
    rest = submitter.submit_due(sub_deps, executor=executor)
    assert rest.started == 3 and {load(i).state for i in ids} == {"processing"}


def test_a_submitter_that_died_after_leasing_leaves_its_jobs_queued_until_the_lease_runs_out(
    sub_deps, new_job, fake_provider, load, clock, executor
):
    ids = _queued(new_job, 3)
    leases = submitter.lease_queued(sub_deps, 10)  # ... and then the process is SIGKILLed
    assert len(leases) == 3 and {load(i).state for i in ids} == {"queued"}
    assert submitter.submit_due(sub_deps, executor=executor).leased == 0  # still leased
    clock.advance(sub_deps.settings.submit_lease_seconds + 0.1)
    report = submitter.submit_due(sub_deps, executor=executor)
    assert report.started == 3 and len(fake_provider.submissions) == 3
    # The dead submitter's leases are stale: starting one now loses the compare-and-set.
    assert submitter.start_leased(sub_deps, leases[0], probe=False) == ("lost", None)
    assert len(fake_provider.submissions) == 3


def test_a_slow_submitter_whose_lease_was_taken_over_does_not_send_the_job(sub_deps, new_job, fake_provider, load, clock):
    job_id = new_job()
    [old] = submitter.lease_queued(sub_deps, 1)  # a submitter stalls past its lease ...
    clock.advance(sub_deps.settings.submit_lease_seconds + 0.1)
    [new] = submitter.lease_queued(sub_deps, 1)  # ... and another leases the same, still queued, job
    assert new.job_id == old.job_id == job_id and new.seq != old.seq
    assert submitter.start_leased(sub_deps, old, probe=False) == ("lost", None)  # the stale one wakes up: no send
    assert fake_provider.calls["submit"] == 0 and load(job_id).state == "queued"
    assert submitter.start_leased(sub_deps, new, probe=False)[0] == "accepted"
    assert len(fake_provider.submissions) == 1


def test_a_transient_error_puts_only_that_job_back_with_backoff(sub_deps, new_job, fake_provider, load, clock, executor):
    ids = _queued(new_job, 3)
    sub_deps.settings = sub_deps.settings.model_copy(update={"submit_threads": 1})
    fake_provider.script("submit", httpx.Response(502, text="<html>bad gateway</html>"))
    report = submitter.submit_due(sub_deps, executor=ThreadPoolExecutor(max_workers=1))
    assert report.started == 3 and report.accepted == 2
    back = [load(i) for i in ids if load(i).state == "queued"]
    assert len(back) == 1 and back[0].attempts == 1 and back[0].next_attempt_at > clock.now()
    assert report.next_due_in == pytest.approx((back[0].next_attempt_at - clock.now()).total_seconds(), abs=0.01)
    clock.advance(report.next_due_in)
    assert submitter.submit_due(sub_deps, executor=executor).accepted == 1
    assert {load(i).state for i in ids} == {"processing"} and len(fake_provider.submissions) == 3


def test_two_submitters_at_once_never_send_a_job_twice(sub_deps, new_job, fake_provider, executor):
    _queued(new_job, 40)
    barrier = threading.Barrier(2)

    def one_pass():
        barrier.wait()
        return submitter.submit_due(sub_deps, executor=executor)

    with ThreadPoolExecutor(max_workers=2) as outer:
        reports = list(outer.map(lambda _: one_pass(), range(2)))
    assert sum(r.accepted for r in reports) == 40
    prompts = [t.body["prompt"] for t in fake_provider.submissions]
    assert len(prompts) == 40 and len(set(prompts)) == 40


def test_the_submitter_holds_back_while_the_pollers_are_behind(sub_deps, new_job, fake_provider, clock, load, executor):
    sub_deps.settings = sub_deps.settings.model_copy(update={"submit_backpressure_seconds": 1.0})
    first = _queued(new_job, 2)
    assert submitter.submit_due(sub_deps, executor=executor).accepted == 2
    later = _queued(new_job, 3)
    # The first two come due for polling and nobody polls them for longer than the grace.
    clock.advance(sub_deps.settings.first_poll_delay + 1.5)
    held = submitter.submit_due(sub_deps, executor=executor)
    assert held.backpressure and held.started == 0 and fake_provider.calls["submit"] == 2
    assert held.next_due_in == pytest.approx(submitter.BACKPRESSURE_RECHECK)
    assert {load(i).state for i in later} == {"queued"}
    poller.poll_due(sub_deps, executor=executor)  # the pollers catch up ...
    assert {load(i).state for i in first} == {"succeeded"}
    resumed = submitter.submit_due(sub_deps, executor=executor)  # ... and submitting resumes
    assert not resumed.backpressure and resumed.accepted == 3


def test_pacing_spreads_a_burst_at_the_configured_rate(sub_deps, new_job, fake_provider, clock, load, executor):
    sub_deps.limiter = MemoryLimiter(clock=clock.monotonic, pace_per_second=10)  # a burst of 5 every half second
    ids = _queued(new_job, 12)
    first = submitter.submit_due(sub_deps, executor=executor)
    assert first.started == 5 and first.next_due_in == pytest.approx(0.1, abs=0.01)
    clock.advance(0.5)
    assert submitter.submit_due(sub_deps, executor=executor).started == 5
    clock.advance(0.2)
    assert submitter.submit_due(sub_deps, executor=executor).started == 2
    assert {load(i).state for i in ids} == {"processing"} and len(fake_provider.submissions) == 12
    assert all(load(i).attempts == 1 for i in ids)  # waiting for a token spends no attempt


def test_a_401_mid_batch_stops_the_batch_and_the_rest_wait_queued(sub_deps, new_job, fake_provider, load, clock):
    ids = _queued(new_job, 5)
    sub_deps.settings = sub_deps.settings.model_copy(update={"submit_threads": 1})
    fake_provider.api_key = "rotated"  # every call now answers 401
    report = submitter.submit_due(sub_deps, executor=ThreadPoolExecutor(max_workers=1))
    assert fake_provider.calls["submit"] == 1  # the first 401 opened the breaker; nobody else tried
    assert report.started == 1 and report.deferred == 4
    assert sub_deps.breaker.state()["open"]
    assert report.next_due_in == pytest.approx(sub_deps.settings.breaker_open_seconds, abs=1)
    assert {load(i).state for i in ids} == {"queued"}
    assert sorted(load(i).attempts for i in ids) == [0, 0, 0, 0, 1]
    assert sub_deps.limiter.slots_held() == 0  # no limiter slot kept by waiting jobs


def test_s3_down_at_submit_leaves_leased_jobs_queued_and_a_later_pass_sends_them_with_their_images(
    sub_deps, new_job, fake_provider, load, limiter, down_storage, clock, executor, make_image
):
    import base64

    from worker.core.codes import ErrorCode

    images = [make_image("PNG", color=(i, 0, 0)) for i in range(3)]
    ids = [new_job(prompt=f"stored {i}", image="data:image/png;base64," + base64.b64encode(data).decode()) for i, data in enumerate(images)]
    working, sub_deps.storage = sub_deps.storage, down_storage

    report = submitter.submit_due(sub_deps, executor=executor)

    assert (report.leased, report.started, report.deferred) == (3, 0, 3)
    assert fake_provider.calls["submit"] == 0  # nothing sent without its image
    for job_id in ids:
        job = load(job_id)
        assert (job.state, job.attempts, job.error_code) == ("queued", 0, ErrorCode.INPUT_UNAVAILABLE.value)
    assert limiter.slots_held() == 0  # every slot handed back
    assert report.next_due_in is not None and report.next_due_in > 0

    sub_deps.storage = working  # S3 is back
    clock.advance(report.next_due_in + 60)
    later = submitter.submit_due(sub_deps, executor=executor)

    assert later.accepted == 3
    sent = {t.body["prompt"]: t.body["image"] for t in fake_provider.submissions}
    assert sent == {f"stored {i}": "data:image/png;base64," + base64.b64encode(data).decode() for i, data in enumerate(images)}
    assert {load(i).state for i in ids} == {"processing"}


def test_adaptive_pacing_starts_at_its_floor_and_follows_the_fleets_copy_out_rate(sub_deps, new_job, fake_provider, clock, executor):
    sub_deps.settings = sub_deps.settings.model_copy(update={"adaptive_pacing": True, "adaptive_pace_floor": 4.0})
    sub_deps.limiter = MemoryLimiter(clock=clock.monotonic)  # no manual pace
    assert submitter.pace_rate(sub_deps) == 4.0  # nothing copied yet: the floor
    _queued(new_job, 30)
    assert submitter.submit_due(sub_deps, executor=executor).started == 2  # half a second's worth at 4/s
    sub_deps.fleet.note_copied(10)  # the fleet copied 10 jobs out in this second ...
    clock.advance(1.0)
    assert submitter.pace_rate(sub_deps) == pytest.approx(10 * submitter.PACE_HEADROOM)  # ... so it may submit faster
    assert submitter.submit_due(sub_deps, executor=executor).started == int(10 * submitter.PACE_HEADROOM / 2)
    clock.advance(submitter.PACE_WINDOW_SECONDS + 1)
    assert submitter.pace_rate(sub_deps) == 4.0  # what was learned ages out of the window


def test_a_manual_pace_overrides_adaptive_pacing(sub_deps, new_job, fake_provider, clock, executor):
    sub_deps.fleet.note_copied(100)
    clock.advance(1.0)
    sub_deps.settings = sub_deps.settings.model_copy(update={"adaptive_pacing": True, "submit_pace_per_second": 4.0})
    sub_deps.limiter = MemoryLimiter(clock=clock.monotonic, pace_per_second=4.0)  # as deps.py builds it from the setting
    assert submitter.pace_rate(sub_deps) is None  # the limiter's own (manual) pace, not the learned 150/s
    _queued(new_job, 10)
    assert submitter.submit_due(sub_deps, executor=executor).started == 2


def test_the_batch_poller_counts_what_it_copied_out_for_adaptive_pacing(sub_deps, new_job, clock, executor):
    sub_deps.settings = sub_deps.settings.model_copy(update={"adaptive_pacing": True, "adaptive_pace_floor": 1.0})
    sub_deps.limiter = MemoryLimiter(clock=clock.monotonic)
    _queued(new_job, 3)
    sub_deps.settings = sub_deps.settings.model_copy(update={"adaptive_pace_floor": 100.0})
    assert submitter.submit_due(sub_deps, executor=executor).accepted == 3
    clock.advance(sub_deps.settings.first_poll_delay)
    assert poller.poll_due(sub_deps, executor=executor).finished == 3
    clock.advance(1.0)
    assert sub_deps.fleet.peak_copy_rate(submitter.PACE_WINDOW_SECONDS) == 3.0
