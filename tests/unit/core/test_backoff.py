"""Backoff with full jitter, honouring Retry-After."""

from __future__ import annotations

import random

import pytest

from worker.core.backoff import compute_backoff, jittered


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
