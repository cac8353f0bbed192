"""The shared provider limits on a real Redis: every worker process sees one rate window and one
concurrency budget, so a fleet stays inside the account tier."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from worker.adapters.limits import RedisLimits

pytestmark = pytest.mark.integration


def test_rate_and_concurrency_are_shared_by_separate_clients(cluster):
    url = cluster.env["CELERY_BROKER_URL"]
    a, b = (RedisLimits.from_url(url, rate_per_minute=5, max_concurrency=3) for _ in range(2))
    grants = [a.acquire("job-1").open, b.acquire("job-2").open, a.acquire("job-3").open]
    assert grants == [True, True, True]
    over = b.acquire("job-4")
    assert not over.open and "concurrency" in over.reason
    a.release("job-2")
    assert b.acquire("job-4").open
    a.release("job-1")
    assert a.acquire("job-5").open  # the 5th submission of the minute
    a.release("job-3")
    full = b.acquire("job-6")
    assert not full.open and "rate" in full.reason and 0 < full.wait <= 60


@pytest.mark.worker_env(EDIT_WORKER_MAX_CONCURRENCY="2")
def test_a_fleet_never_runs_more_provider_tasks_at_once_than_the_tier_allows(cluster, sample_image):
    cluster.sandbox_config(latency=3.0)
    cluster.start_worker("w1", concurrency=2)
    cluster.start_worker("w2", concurrency=2)
    cluster.start_beat()
    for i in range(6):
        cluster.submit(str(sample_image), f"concurrency-limited edit {i}", size="512*512")
    done = cluster.wait_all_terminal(6, timeout=120)
    assert [j.state for j in done] == ["succeeded"] * 6
    cluster.assert_one_submission_per_job(done)

    # From the provider's side: each task runs from its creation for the 3 s latency.
    spans = []
    for task in cluster.sandbox_stats()["tasks"]:
        start = datetime.fromisoformat(task["created_at"].replace("Z", "+00:00"))
        spans.append((start, start + timedelta(seconds=3)))
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2, f"{peak} provider tasks ran at once; the limit is 2"


def test_batch_slots_are_shared_with_single_acquires_and_stop_at_the_first_limit(cluster):
    url = cluster.env["CELERY_BROKER_URL"]
    a, b = (RedisLimits.from_url(url, rate_per_minute=6, max_concurrency=4) for _ in range(2))
    assert a.capacity() == 4
    assert b.acquire("single").open
    granted, gate = a.acquire_many(["m1", "m2", "m3", "m4", "m5"])
    assert granted == 3 and not gate.open and "concurrency" in gate.reason  # 1 + 3 = the 4 slots
    assert not isinstance(b.capacity(), int)  # no room now, for anyone
    b.release_many(["m1", "m2", "single"])
    granted, gate = b.acquire_many(["m4", "m5", "m6"])
    assert granted == 2 and not gate.open and "rate" in gate.reason and 0 < gate.wait <= 60  # 6 in the minute
    wait = a.capacity()
    assert not isinstance(wait, int) and "rate" in wait.reason


def test_pacing_is_one_token_bucket_for_every_client(cluster):
    import time

    url = cluster.env["CELERY_BROKER_URL"]
    a, b = (RedisLimits.from_url(url, rate_per_minute=10**6, max_concurrency=10**6, pace_per_second=20) for _ in range(2))
    first, _ = a.pace(100)
    assert first == 10  # the burst: half a second's worth
    taken, wait = b.pace(5)
    assert taken == 0 and 0 < wait <= 0.05 + 0.01  # the other client sees the same empty bucket
    started, total = time.monotonic(), 0
    while time.monotonic() - started < 1.0:  # bounded: one second of asking as fast as possible
        total += (a if total % 2 else b).pace(3)[0]
    assert 17 <= total <= 22, f"{total} tokens in one second at 20/s"


def test_the_typical_inference_time_is_one_average_for_the_fleet(cluster):
    url = cluster.env["CELERY_BROKER_URL"]
    a, b = (RedisLimits.from_url(url, rate_per_minute=10, max_concurrency=10) for _ in range(2))
    assert a.typical_inference() is None
    a.observe_inference(10.0)
    b.observe_inference(20.0)  # weighted 0.2: 10 * 0.8 + 20 * 0.2
    assert b.typical_inference() == pytest.approx(12.0)
    fresh = RedisLimits.from_url(url, rate_per_minute=10, max_concurrency=10)
    assert fresh.typical_inference() == pytest.approx(12.0)
