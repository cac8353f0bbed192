"""The in-memory circuit breaker: the same behaviour as the Redis one, which
tests/integration/test_limits.py checks on real Redis servers."""

from __future__ import annotations

import pytest

from worker.adapters.breaker import GO, Gate, MemoryBreaker


class Ticks:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_gate_says_go_only_when_there_is_nothing_to_wait_for():
    assert GO.go and Gate(0.0, "probe", probe=True).go
    assert not Gate(1.5, "circuit breaker open").go


def test_a_tripped_breaker_blocks_then_lets_exactly_one_probe_through():
    clock = Ticks()
    breaker = MemoryBreaker(clock=clock)
    breaker.trip(60, "provider refused the credentials")
    gate = breaker.check()
    assert not gate.go and gate.wait == pytest.approx(60) and "refused the credentials" in gate.reason
    assert breaker.wait() == pytest.approx(60)
    clock.t = 61
    assert breaker.check().go  # the probe
    assert not breaker.check().go  # everyone else waits for its outcome
    breaker.reset()
    assert breaker.check().go and breaker.check().go
    assert breaker.state()["tripped"] is False


def test_a_half_open_probe_that_never_reports_back_expires_like_the_redis_one():
    # RedisBreaker keeps the probe key for 30 s; a probe that never reports (its job was deferred by
    # the rate limiter, or its submit was ambiguous) must not block every submission forever.
    clock = Ticks()
    breaker = MemoryBreaker(clock=clock)
    breaker.trip(60, "bad key")
    clock.t = 61
    assert breaker.check().go
    assert not breaker.check().go
    clock.t = 61 + 31
    assert breaker.check().go


def test_a_released_probe_lets_the_next_submission_probe_at_once():
    clock = Ticks()
    breaker = MemoryBreaker(clock=clock)
    breaker.trip(1, "outage")
    clock.t = 2
    assert breaker.check().probe
    breaker.release_probe()
    assert breaker.check().probe


def test_a_run_of_transient_failures_opens_the_breaker_and_a_success_resets_the_count():
    clock = Ticks()
    breaker = MemoryBreaker(clock=clock)
    for _ in range(2):
        assert not breaker.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    breaker.record_success()
    for _ in range(2):
        assert not breaker.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    assert breaker.record_failure(threshold=3, window=30, open_seconds=10, reason="502")
    state = breaker.state()
    assert state["open"] and breaker.wait() == pytest.approx(10)
    assert state["reason"] == "provider unavailable: 3 failures in 30s (502)"


def test_failures_outside_the_window_do_not_count():
    clock = Ticks()
    breaker = MemoryBreaker(clock=clock)
    for t in (0, 20, 40):
        clock.t = t
        assert not breaker.record_failure(threshold=3, window=30, open_seconds=10, reason="x")


def test_a_failed_probe_reopens_the_breaker_at_once():
    clock = Ticks()
    breaker = MemoryBreaker(clock=clock)
    breaker.trip(5, "outage")
    clock.t = 6
    assert breaker.check().probe
    assert breaker.record_failure(threshold=100, window=30, open_seconds=10, reason="503")
    assert breaker.wait() == pytest.approx(10)
