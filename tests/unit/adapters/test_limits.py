"""The in-memory limits (rate, concurrency, circuit breaker, submission journal): the same behaviour
as the Redis ones, which tests/integration/test_limits.py checks on a real Redis."""

from __future__ import annotations

import pytest

from worker.adapters.limits import MemoryLimits


class Ticks:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# --- backoff --------------------------------------------------------------------------------


# --- limits ---------------------------------------------------------------------------------


def test_the_rate_limit_counts_submissions_in_a_sliding_minute():
    clock = Ticks()
    limits = MemoryLimits(rate_per_minute=2, clock=clock)
    assert limits.acquire("a").open and limits.acquire("b").open
    gate = limits.acquire("c")
    assert not gate.open and gate.wait == pytest.approx(60.0) and "rate" in gate.reason
    clock.t = 60.5
    assert limits.acquire("c").open


def test_the_concurrency_limit_frees_a_slot_on_release():
    limits = MemoryLimits(max_concurrency=1, clock=Ticks())
    assert limits.acquire("a").open
    gate = limits.acquire("b")
    assert not gate.open and "concurrency" in gate.reason
    limits.release("a")
    assert limits.acquire("b").open


def test_a_tripped_breaker_blocks_then_lets_exactly_one_probe_through():
    clock = Ticks()
    limits = MemoryLimits(clock=clock)
    limits.trip_breaker(60, "provider refused the credentials")
    gate = limits.check_breaker()
    assert not gate.open and gate.wait == pytest.approx(60) and "refused the credentials" in gate.reason
    assert limits.breaker_wait() == pytest.approx(60)
    clock.t = 61
    assert limits.check_breaker().open  # the probe
    assert not limits.check_breaker().open  # everyone else waits for its outcome
    limits.reset_breaker()
    assert limits.check_breaker().open and limits.check_breaker().open
    assert limits.breaker_state()["tripped"] is False


def test_a_half_open_probe_that_never_reports_back_expires_like_the_redis_one():
    # RedisLimits keeps the probe key for 30 s; a probe that never reports (its job was deferred by the
    # rate limiter, or its submit was ambiguous) must not block every submission forever.
    clock = Ticks()
    limits = MemoryLimits(clock=clock)
    limits.trip_breaker(60, "bad key")
    clock.t = 61
    assert limits.check_breaker().open
    assert not limits.check_breaker().open
    clock.t = 61 + 31
    assert limits.check_breaker().open


def test_a_run_of_transient_failures_opens_the_breaker_and_a_success_resets_the_count():
    clock = Ticks()
    limits = MemoryLimits(clock=clock)
    for _ in range(2):
        assert not limits.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    limits.record_success()
    for _ in range(2):
        assert not limits.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    assert limits.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    assert limits.breaker_state()["open"] and limits.breaker_wait() == pytest.approx(10)


def test_failures_outside_the_window_do_not_count():
    clock = Ticks()
    limits = MemoryLimits(clock=clock)
    for t in (0, 20, 40):
        clock.t = t
        assert not limits.record_failure(threshold=3, window=30, open_seconds=10, reason="x")


def test_the_submission_journal_remembers_by_job():
    limits = MemoryLimits(clock=Ticks())
    assert limits.recall_submission("job-1") is None
    limits.remember_submission("job-1", "pred-9")
    assert limits.recall_submission("job-1") == "pred-9"


# --- settings -------------------------------------------------------------------------------
