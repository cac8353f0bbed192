"""Backoff as one pure function: exponential with full jitter, capped, honouring Retry-After."""

from __future__ import annotations

import random


def compute_backoff(
    attempt: int,
    *,
    base: float = 2.0,
    maximum: float = 60.0,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before try number `attempt + 1` (attempt counts from 0).

    Full jitter (uniform in [0, min(max, base * 2**attempt)]) spreads a fleet's retries after an
    outage; a provider's Retry-After is a floor, never shortened by the jitter.
    """
    uniform = (rng or random).uniform
    ceiling = min(maximum, base * (2 ** max(0, min(attempt, 30))))
    delay = uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, float(retry_after))
    return delay


def jittered(interval: float, jitter: float, rng: random.Random | None = None) -> float:
    """A poll interval with +[0, jitter] seconds added, so polls of many jobs don't fall in step."""
    return interval + (rng or random).uniform(0, jitter)
