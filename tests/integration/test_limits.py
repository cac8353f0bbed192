"""The shared provider limits on a real Redis: every worker process sees one rate window and one
concurrency budget, so a fleet stays inside the account tier."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from worker.limits import RedisLimits

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
