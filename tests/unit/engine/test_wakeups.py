"""Specification of waking the batch loops (worker/engine/wakeups.py): a wake-up is due at the
next half-second boundary after its work (never before it), wake-ups due in the same half second
are shared, and neither a Redis nor a broker outage turns into an error."""

from __future__ import annotations

import math

import pytest
import redis

from worker.adapters.fleet import MemoryFleet
from worker.core.steps import Step
from worker.engine import wakeups


def due_at(deps, countdown: float) -> float:
    return deps.clock().timestamp() + countdown


@pytest.mark.parametrize("elapsed, delay", [(0.0, 1.0), (0.3, 1.0), (0.3, 0.0), (0.75, 2.1)])
def test_a_wakeup_is_due_at_the_half_second_boundary_after_its_work_never_before(deps, clock, elapsed, delay):
    clock.advance(elapsed)
    nxt = wakeups.poller_wakeup(deps, delay)
    assert nxt is not None and nxt.step == Step.POLL_DUE and nxt.job_id is None
    assert delay <= nxt.countdown < delay + wakeups.WAKEUP_BUCKET
    due = due_at(deps, nxt.countdown)
    assert math.isclose(due / wakeups.WAKEUP_BUCKET, round(due / wakeups.WAKEUP_BUCKET), abs_tol=1e-6)


def test_work_already_due_wakes_the_loop_now_or_at_the_coming_boundary(deps, clock):
    clock.advance(0.2)
    nxt = wakeups.submitter_wakeup(deps, -5.0)
    assert nxt is not None and 0.0 <= nxt.countdown < wakeups.WAKEUP_BUCKET


def test_wakeups_in_the_same_half_second_are_shared(deps):
    first = wakeups.submitter_wakeup(deps, 1.0)
    assert first is not None and first.step == Step.SUBMIT_DUE and 1.0 <= first.countdown < 1.5
    assert wakeups.submitter_wakeup(deps, 1.0) is None
    assert wakeups.submitter_wakeup(deps, 1.0, dedupe=False) is not None


def test_wakeups_in_different_half_seconds_or_for_different_loops_are_not_shared(deps):
    assert wakeups.poller_wakeup(deps, 1.0) is not None
    assert wakeups.poller_wakeup(deps, 2.0) is not None  # another half second
    assert wakeups.submitter_wakeup(deps, 1.0) is not None  # the other loop
    assert wakeups.poller_wakeup(deps, 1.0) is None


def test_a_shared_wakeup_is_published_again_once_its_mark_has_lapsed(deps, clock):
    assert wakeups.poller_wakeup(deps, 0.0) is not None
    clock.advance(61)  # the de-duplication mark outlives the wake-up by a minute, then lapses
    assert wakeups.poller_wakeup(deps, 0.0) is not None


class RedisDown(MemoryFleet):
    def once(self, key: str, ttl: float) -> bool:
        raise redis.ConnectionError("redis unreachable")


def test_without_redis_a_wakeup_is_published_anyway(deps, clock):
    deps.fleet = RedisDown(clock=clock.monotonic)
    first = wakeups.poller_wakeup(deps, 1.0)
    assert first is not None and first.step == Step.POLL_DUE
    assert wakeups.poller_wakeup(deps, 1.0) is not None  # no de-duplication: a duplicate pass finds nothing


def test_wake_poller_publishes_the_wakeup(deps, publisher):
    wakeups.wake_poller(deps, 1.0)
    [(step, job_id, countdown, poll_seq)] = publisher.sent
    assert (step, job_id, poll_seq) == (Step.POLL_DUE, None, None) and 1.0 <= countdown < 1.5
    wakeups.wake_poller(deps, 1.0)
    assert len(publisher.sent) == 1  # shared with the one already sent


def test_wake_poller_logs_a_broker_outage_instead_of_raising(deps, caplog):
    class BrokerDown:
        def publish(self, *args, **kwargs):
            raise ConnectionError("broker unreachable")

    deps.publisher = BrokerDown()
    wakeups.wake_poller(deps, 1.0)
    assert "could not wake the poller" in caplog.text
