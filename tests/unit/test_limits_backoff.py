"""Specification of the small pure pieces: backoff with full jitter honouring Retry-After, the
in-memory limits (rate, concurrency, circuit breaker, submission journal) and secret-safe settings."""

from __future__ import annotations

import random

import pytest

from worker.adapters.limits import MemoryLimits
from worker.config import Settings
from worker.core.backoff import compute_backoff, jittered


class Ticks:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# --- backoff --------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt, ceiling", [(0, 2.0), (1, 4.0), (3, 16.0), (10, 60.0), (500, 60.0)])
def test_backoff_is_full_jitter_below_an_exponential_capped_ceiling(attempt, ceiling):
    rng = random.Random(0)
    delays = [compute_backoff(attempt, base=2.0, maximum=60.0, rng=rng) for _ in range(500)]
    assert all(0 <= d <= ceiling for d in delays)
    assert max(delays) > ceiling * 0.9  # spread over the whole range, not clumped


def test_retry_after_is_a_floor_never_shortened_by_jitter():
    rng = random.Random(0)
    assert all(compute_backoff(0, retry_after=30, rng=rng) >= 30 for _ in range(100))
    # ...even beyond the normal cap.
    assert compute_backoff(0, maximum=5, retry_after=120, rng=rng) == 120


def test_backoff_is_reproducible_with_a_seeded_rng():
    assert compute_backoff(4, rng=random.Random(7)) == compute_backoff(4, rng=random.Random(7))


def test_jittered_adds_between_zero_and_the_jitter():
    rng = random.Random(0)
    values = [jittered(2.0, 0.5, rng) for _ in range(200)]
    assert all(2.0 <= v <= 2.5 for v in values) and len(set(values)) > 100


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


def test_settings_never_show_secrets():
    settings = Settings(_env_file=None, wavespeed_api_key="ws-very-secret", aws_secret_access_key="aws-very-secret")
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert "ws-very-secret" not in text and "aws-very-secret" not in text
    assert settings.wavespeed_api_key.get_secret_value() == "ws-very-secret"


def test_settings_read_the_contract_names_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "sqlite:///elsewhere.db")
    monkeypatch.setenv("S3_BUCKET", "from-env")
    monkeypatch.setenv("EDIT_WORKER_POLL_INTERVAL", "5")
    settings = Settings(_env_file=None)
    assert (settings.database_url, settings.s3_bucket, settings.poll_interval) == ("sqlite:///elsewhere.db", "from-env", 5.0)


def test_polling_faster_than_every_two_seconds_is_refused():
    with pytest.raises(ValueError):
        Settings(_env_file=None, poll_interval=1.0)
