"""Waking the batch loops. A wake-up is a `poll_due` / `submit_due` / `deliver_callbacks` message
due at the next half second boundary after the work is: many jobs (or producers) due in the same half second share one
message, de-duplicated through Redis, and rounding up means a loop never wakes before its work.
"""

from __future__ import annotations

import logging
import math

from worker.adapters.redis_keys import wakeup_name
from worker.core.steps import Next, Step, schedule
from worker.engine.deps import Deps

log = logging.getLogger(__name__)

WAKEUP_BUCKET = 0.5  # seconds


def _wakeup(deps: Deps, step: Step, delay: float, *, dedupe: bool = True) -> Next | None:
    now = deps.clock().timestamp()
    bucket = math.ceil((now + max(0.0, delay)) / WAKEUP_BUCKET)
    if dedupe:
        try:
            if not deps.fleet.once(wakeup_name(step.value, bucket), ttl=max(delay, 0.0) + 60):
                return None
        except Exception:  # Redis down: publish anyway (a duplicate pass finds nothing; a lost wake-up is late)
            pass
    return Next(step, countdown=max(0.0, bucket * WAKEUP_BUCKET - now))


def poller_wakeup(deps: Deps, delay: float) -> Next | None:
    """A poll_due message due in `delay` s, unless one is already due in the same half second."""
    return _wakeup(deps, Step.POLL_DUE, delay)


def submitter_wakeup(deps: Deps, delay: float, *, dedupe: bool = True) -> Next | None:
    """A submit_due message due in `delay` s (de-duplicated per half second unless `dedupe` is off)."""
    return _wakeup(deps, Step.SUBMIT_DUE, delay, dedupe=dedupe)


def wake_poller(deps: Deps, delay: float) -> None:
    """Publish a poller wake-up now; a broker outage is logged, not raised (beat's tick covers it)."""
    try:
        schedule(deps.publisher, poller_wakeup(deps, delay))
    except Exception as exc:
        log.warning("could not wake the poller: %s", type(exc).__name__)


def callbacks_wakeup(deps: Deps, delay: float) -> Next | None:
    """A deliver_callbacks message due in `delay` s, unless one is already due in the same half second."""
    return _wakeup(deps, Step.DELIVER_CALLBACKS, delay)


def wake_callbacks(deps: Deps, queued: bool = True) -> None:
    """After a commit that queued callback deliveries (`queued`): wake the delivery loop now. A
    broker or Redis outage is logged, not raised: beat's tick delivers them a little later."""
    if not queued:
        return
    try:
        schedule(deps.publisher, callbacks_wakeup(deps, 0.0))
    except Exception as exc:
        log.warning("could not wake the callback deliveries: %s", type(exc).__name__)
