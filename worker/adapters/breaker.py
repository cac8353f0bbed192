"""The provider circuit breaker, shared by the fleet through Redis (`MemoryBreaker`: the same in one
process, for tests): open after refused credentials or a run of transient failures, then half-open
with exactly one probe submission. `Gate` is the answer to "may I submit now?".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from worker.adapters.redis_keys import DEFAULT_NAMESPACE, RedisKeys


@dataclass(frozen=True)
class Gate:
    """The answer to "may I submit now?": `go`, or wait `wait` seconds for `reason`."""

    wait: float
    reason: str = ""
    probe: bool = False  # granted as the half-open breaker's one probe: use it or release_probe()

    @property
    def go(self) -> bool:
        return self.wait <= 0


GO = Gate(0.0)

# How long a half-open breaker's probe is held before another submission may probe (a probe whose
# job was deferred, or whose submit was ambiguous, never reports back).
PROBE_SECONDS = 30.0


class Breaker(Protocol):
    def check(self) -> Gate: ...  # may a submission go? (half-open: grants the one probe)
    def wait(self) -> float: ...  # seconds the breaker stays open (0: closed or half-open); no probe taken
    def trip(self, seconds: float, reason: str) -> None: ...
    def reset(self) -> None: ...  # closed (a submission went through)
    def release_probe(self) -> None: ...  # an unused probe goes back
    def state(self) -> dict: ...  # {"open", "seconds_left", "reason", "tripped"}
    # Outage detection: transient failures counted fleet-wide within `window`; `threshold` of them
    # (or any one while half-open: the probe failed) open the breaker for `open_seconds`.
    def record_failure(self, *, threshold: int, window: float, open_seconds: float, reason: str) -> bool: ...
    def record_success(self) -> None: ...


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _outage_reason(count: int, window: float, reason: str) -> str:
    return f"provider unavailable: {count} failures in {window:.0f}s ({reason})"


# KEYS: failures counter, tripped flag   ARGV: window_ms -> {failures in the window, half-open?}
# The window starts at the first failure: the expiry is set only on a counter that has none.
# (Not `PEXPIRE … NX`: that needs Redis 7, and the embedded redis-server is 6.2.)
_RECORD_FAILURE = """
local count = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return {count, redis.call('EXISTS', KEYS[2])}
"""


class RedisBreaker:
    """The breaker in Redis: the open-until key's TTL is the open time; a `tripped` flag outlives
    it (half-open) until a submission goes through."""

    def __init__(self, client: redis.Redis, *, namespace: str = DEFAULT_NAMESPACE):
        self.r = client
        keys = RedisKeys(namespace)
        self.k_breaker, self.k_tripped, self.k_probe = keys.breaker, keys.breaker_tripped, keys.breaker_probe
        self.k_failures = keys.failures
        self._record_failure = client.register_script(_RECORD_FAILURE)

    def check(self) -> Gate:
        ttl = self.r.pttl(self.k_breaker)
        if ttl and ttl > 0:
            return Gate(ttl / 1000.0, f"circuit breaker open: {_text(self.r.get(self.k_breaker)) or 'provider refused'}")
        if self.r.exists(self.k_tripped):
            # Half-open: exactly one probe submission goes through; the rest wait for its outcome.
            if self.r.set(self.k_probe, "1", nx=True, px=int(PROBE_SECONDS * 1000)):
                return Gate(0.0, "circuit breaker half-open: probe", probe=True)
            return Gate(2.0, "circuit breaker half-open: waiting for the probe submission")
        return GO

    def wait(self) -> float:
        ttl = self.r.pttl(self.k_breaker)
        return ttl / 1000.0 if ttl and ttl > 0 else 0.0

    def trip(self, seconds: float, reason: str) -> None:
        pipe = self.r.pipeline()
        pipe.set(self.k_breaker, reason[:200], px=max(1, int(seconds * 1000)))
        pipe.set(self.k_tripped, "1")
        pipe.delete(self.k_probe)
        pipe.execute()

    def reset(self) -> None:
        if self.r.exists(self.k_tripped) or self.r.exists(self.k_breaker):
            self.r.delete(self.k_breaker, self.k_tripped, self.k_probe)

    def release_probe(self) -> None:
        self.r.delete(self.k_probe)

    def state(self) -> dict:
        ttl = self.r.pttl(self.k_breaker)
        return {
            "open": bool(ttl and ttl > 0),
            "seconds_left": max(0.0, (ttl or 0) / 1000.0),
            "reason": self.r.get(self.k_breaker),
            "tripped": bool(self.r.exists(self.k_tripped)),
        }

    def record_failure(self, *, threshold: int, window: float, open_seconds: float, reason: str) -> bool:
        count, half_open = self._record_failure(keys=[self.k_failures, self.k_tripped], args=[max(1, int(window * 1000))])
        # A failure while half-open (the probe failed) reopens at once.
        if (int(count) >= threshold or int(half_open)) and not self.wait():
            self.r.delete(self.k_failures)
            self.trip(open_seconds, _outage_reason(int(count), window, reason))
            return True
        return False

    def record_success(self) -> None:
        self.r.delete(self.k_failures)


class MemoryBreaker:
    """The same breaker in one process, on an injectable clock (unit tests, single-process tools)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._until = 0.0
        self._reason = ""
        self._tripped = False
        self._probe_until: float | None = None  # a probe is out until then
        self._failures: list[float] = []

    def check(self) -> Gate:
        with self._lock:
            now = self.clock()
            if now < self._until:
                return Gate(self._until - now, f"circuit breaker open: {self._reason}")
            if self._tripped:
                # Like the Redis probe key's TTL: a probe that never reports back expires.
                if self._probe_until is None or now >= self._probe_until:
                    self._probe_until = now + PROBE_SECONDS
                    return Gate(0.0, "circuit breaker half-open: probe", probe=True)
                return Gate(2.0, "circuit breaker half-open: waiting for the probe submission")
            return GO

    def wait(self) -> float:
        with self._lock:
            return max(0.0, self._until - self.clock())

    def trip(self, seconds: float, reason: str) -> None:
        with self._lock:
            self._until = self.clock() + seconds
            self._reason = reason
            self._tripped = True
            self._probe_until = None

    def reset(self) -> None:
        with self._lock:
            self._until = 0.0
            self._tripped = False
            self._probe_until = None

    def release_probe(self) -> None:
        with self._lock:
            self._probe_until = None

    def state(self) -> dict:
        with self._lock:
            left = max(0.0, self._until - self.clock())
            return {"open": left > 0, "seconds_left": left, "reason": self._reason or None, "tripped": self._tripped}

    def record_failure(self, *, threshold: int, window: float, open_seconds: float, reason: str) -> bool:
        with self._lock:
            now = self.clock()
            self._failures = [t for t in self._failures if t > now - window] + [now]
            count = len(self._failures)
            trip = (count >= threshold or self._tripped) and now >= self._until
            if trip:
                self._failures = []
        if trip:
            self.trip(open_seconds, _outage_reason(count, window, reason))
        return trip

    def record_success(self) -> None:
        with self._lock:
            self._failures = []
