"""The in-memory limiter (rate, concurrency, pacing): the same behaviour as the Redis one, which
tests/integration/test_limits.py checks on real Redis servers."""

from __future__ import annotations

import pytest

from worker.adapters.limiter import MemoryLimiter, pace_burst


class Ticks:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_rate_limit_counts_submissions_in_a_sliding_minute():
    clock = Ticks()
    limiter = MemoryLimiter(rate_per_minute=2, clock=clock)
    assert limiter.acquire("a").go and limiter.acquire("b").go
    gate = limiter.acquire("c")
    assert not gate.go and gate.wait == pytest.approx(60.0) and "rate" in gate.reason
    clock.t = 60.5
    assert limiter.acquire("c").go


def test_the_concurrency_limit_frees_a_slot_on_release():
    limiter = MemoryLimiter(max_concurrency=1, clock=Ticks())
    assert limiter.acquire("a").go
    gate = limiter.acquire("b")
    assert not gate.go and "concurrency" in gate.reason
    assert limiter.slots_held() == 1
    limiter.release("a")
    assert limiter.acquire("b").go


def test_batch_slots_stop_at_the_first_limit_and_capacity_says_how_many_fit():
    limiter = MemoryLimiter(rate_per_minute=10, max_concurrency=3, clock=Ticks())
    assert limiter.capacity() == 3
    granted, gate = limiter.acquire_many(["a", "b", "c", "d"])
    assert granted == 3 and not gate.go and "concurrency" in gate.reason
    room = limiter.capacity()
    assert not isinstance(room, int) and "concurrency" in room.reason
    limiter.release_many(["a", "b"])
    assert limiter.slots_held() == 1 and limiter.capacity() == 2


def test_pacing_hands_out_a_burst_then_one_token_per_interval():
    clock = Ticks()
    limiter = MemoryLimiter(pace_per_second=10, clock=clock)
    assert pace_burst(10) == 5
    assert limiter.pace(8) == (5, pytest.approx(0.1))
    clock.t = 0.3
    taken, wait = limiter.pace(8)
    assert taken == 3 and wait > 0


def test_no_pacing_configured_takes_everything_at_once():
    assert MemoryLimiter().pace(50) == (50, 0.0)
