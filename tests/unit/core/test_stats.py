"""What the console's charts and health page read: throughput per bucket, latency percentiles,
error codes, paid work per tenant over a window, and the queue's backlog — on SQLite (the
integration suite reads them on PostgreSQL through the browser tests)."""

from __future__ import annotations

import pytest

from worker.core import jobs, stats
from worker.core.codes import ErrorCode
from worker.core.states import State


def fail_at(sessions, clock, job_id: str, code: str) -> None:
    with sessions() as session:
        assert jobs.transition(session, job_id, State.QUEUED, State.FAILED, "test", clock=clock.now, error_code=code)
        session.commit()


def test_percentiles_interpolate_between_ranks():
    assert stats.percentile([5.0], 0.99) == 5.0
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert stats.percentile(list(map(float, range(1, 101))), 0.9) == pytest.approx(90.1)


def test_each_window_has_its_buckets():
    assert [(w.value, w.buckets, w.bucket_seconds) for w in stats.Window] == [("1h", 12, 300), ("24h", 24, 3600), ("7d", 28, 21600)]


def test_throughput_counts_finished_jobs_in_their_buckets_and_ignores_older_ones(sessions, clock, new_job):
    old = new_job(prompt="before the window")
    fail_at(sessions, clock, old, "1200")
    clock.advance(3600 + 60)  # the window (1 h) starts after it
    early = new_job(prompt="early")
    fail_at(sessions, clock, early, ErrorCode.DEADLINE.value)
    clock.advance(20 * 60)
    late = [new_job(prompt=f"late {i}") for i in range(2)]
    for job_id in late:
        fail_at(sessions, clock, job_id, ErrorCode.DEADLINE.value)
    clock.advance(39 * 60 + 30)  # now: early finished 59.5 min ago, late 39.5 min ago
    data = stats.charts(sessions, stats.Window.HOUR, clock.now())
    assert data.throughput["failed"] == [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
    assert sum(data.throughput["succeeded"]) == 0
    assert data.error_codes == [(ErrorCode.DEADLINE.value, 3)]  # the 1200 is outside the window


def test_latency_percentiles_and_paid_work_per_tenant(sessions, clock, new_job, drive, settings):
    shop = [new_job(prompt=f"shop {i}", tenant="shop") for i in range(3)]
    blog = new_job(prompt="blog", tenant="blog")
    for job_id in [*shop, blog]:
        drive(job_id)
    data = stats.charts(sessions, stats.Window.DAY, clock.now(), cost_per_submission=0.25)
    assert sum(data.throughput["succeeded"]) == 4
    finished = [p for p in data.end_to_end if p is not None]
    assert finished and all(0 < p50 <= p90 <= p99 for p50, p90, p99 in finished)
    took = [(jobs.get_job(sessions, j).finished_at - jobs.get_job(sessions, j).created_at).total_seconds() for j in [*shop, blog]]
    assert min(took) <= min(p[0] for p in finished) and max(p[2] for p in finished) <= max(took)
    assert data.paid == [("blog", 1, 1, 0.25), ("shop", 3, 3, 0.75)]
    only_shop = stats.charts(sessions, stats.Window.DAY, clock.now(), tenant="shop")
    assert [name for name, *_ in only_shop.paid] == ["shop"]


def test_backlog_counts_queued_in_flight_parked_and_the_unsent_outbox(sessions, clock, new_job, deps, submitted):
    first = new_job(prompt="oldest queued")
    clock.advance(30)
    new_job(prompt="queued")
    moving = new_job(prompt="moving")
    submitted(deps, moving)
    parked = new_job(prompt="parked", tenant="shop")
    with sessions() as session:
        assert jobs.transition(
            session, parked, State.QUEUED, State.SUBMITTING, "test", clock=clock.now, error_code=ErrorCode.NEEDS_OPERATOR.value
        )
        session.commit()
    b = stats.backlog(sessions, parked_code=ErrorCode.NEEDS_OPERATOR.value)
    assert b.queued == 2 and b.oldest_queued == jobs.get_job(sessions, first).created_at
    assert b.in_flight == {"submitting": 1, "processing": 1, "uploading": 0}
    assert b.parked == 1
    assert b.outbox_unsent == 4 and b.outbox_oldest is not None  # every job's submit row (nothing relayed here)
    assert stats.backlog(sessions, tenant="default", parked_code=ErrorCode.NEEDS_OPERATOR.value).parked == 0
