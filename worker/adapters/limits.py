"""Shared provider limits: a rate limit, a concurrency limit and a circuit breaker, all in Redis
so that every worker process on every host sees the same ones; `MemoryLimits` is the test stub.

`acquire(token)` answers 0 (go) or how many seconds to wait; jobs wait in `queued`, not in retries.
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
    """The answer to "may I submit now?": wait == 0 means go."""

    wait: float
    reason: str = ""
    probe: bool = False  # granted as the half-open breaker's one probe: use it or release_probe()

    @property
    def open(self) -> bool:
        return self.wait <= 0


GO = Gate(0.0)


class Limits(Protocol):
    def check_breaker(self) -> Gate: ...
    def acquire(self, token: str) -> Gate: ...
    def release(self, token: str) -> None: ...
    def trip_breaker(self, seconds: float, reason: str) -> None: ...
    def reset_breaker(self) -> None: ...
    def release_probe(self) -> None: ...
    def breaker_state(self) -> dict: ...
    # The submission journal: which provider task a job's submit created, written the moment the
    # provider answers, so a worker that dies before its database commit leaves a certain trace.
    def remember_submission(self, job_id: str, prediction_id: str) -> None: ...
    def recall_submission(self, job_id: str) -> str | None: ...
    # Outage detection: transient failures counted fleet-wide; enough of them open the breaker.
    def breaker_wait(self) -> float: ...
    def record_failure(self, *, threshold: int, window: float, open_seconds: float, reason: str) -> bool: ...
    def record_success(self) -> None: ...
    # At most one caller per key within ttl gets True (de-duplicates poller wake-ups); forget()
    # ends it early (a loop's per-node lock: `once` to take it, `forget` to hand it back).
    def once(self, key: str, ttl: float) -> bool: ...
    def forget(self, key: str) -> None: ...
    # Batch forms for the batch submitter: how many submits may start now (and else how long to
    # wait), slots for several jobs in one round trip (a prefix of `tokens` is granted), release many.
    def capacity(self) -> Gate | int: ...
    def acquire_many(self, tokens: list[str]) -> tuple[int, Gate]: ...
    def release_many(self, tokens: list[str]) -> None: ...
    # Pacing (submit_pace_per_second): a token bucket shared by the fleet; takes up to `want`
    # tokens, answers how many it got and, if fewer, when the next one comes.
    def pace(self, want: int) -> tuple[int, float]: ...
    # The model's typical inference time (an EWMA of what the provider reports), for the first poll.
    def observe_inference(self, seconds: float) -> None: ...
    def typical_inference(self) -> float | None: ...


# KEYS: rate zset, active zset   ARGV: window_ms, rate_limit, max_concurrency, token, slot_ttl_ms
# Times come from Redis itself, so hosts with skewed clocks still share one window.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit, conc, token, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = redis.call('ZSCORE', KEYS[2], token)
if (not held) and redis.call('ZCARD', KEYS[2]) >= conc then
  return {-1, 1000}
end
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {-2, math.max(50, tonumber(oldest[2]) + window - now)}
end
redis.call('ZADD', KEYS[1], now, token .. ':' .. now .. ':' .. t[2])
redis.call('ZADD', KEYS[2], now + ttl, token)
redis.call('PEXPIRE', KEYS[1], window * 2)
return {0, 0}
"""


# KEYS: rate zset, active zset   ARGV: window_ms, rate_limit, max_concurrency, slot_ttl_ms, tokens...
# Grants tokens in order until a limit is reached: {granted, status of the first refused, wait_ms}.
_ACQUIRE_MANY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit, conc, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local active, used = redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[1])
local granted = 0
for i = 5, #ARGV do
  local token = ARGV[i]
  local held = redis.call('ZSCORE', KEYS[2], token)
  if (not held) and active >= conc then
    return {granted, -1, 1000}
  end
  if used >= limit then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {granted, -2, math.max(50, tonumber(oldest[2]) + window - now)}
  end
  redis.call('ZADD', KEYS[1], now, token .. ':' .. now .. ':' .. t[2])
  redis.call('ZADD', KEYS[2], now + ttl, token)
  used = used + 1
  if not held then active = active + 1 end
  granted = granted + 1
end
redis.call('PEXPIRE', KEYS[1], window * 2)
return {granted, 0, 0}
"""

# KEYS: rate zset, active zset   ARGV: window_ms, rate_limit, max_concurrency -> {room, wait_ms}
_CAPACITY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local room_c = conc - redis.call('ZCARD', KEYS[2])
local room_r = limit - redis.call('ZCARD', KEYS[1])
if room_c <= 0 then return {0, -1, 1000} end
if room_r <= 0 then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, -2, math.max(50, tonumber(oldest[2]) + window - now)}
end
return {math.min(room_c, room_r), 0, 0}
"""

# KEYS: bucket hash   ARGV: rate per second, burst, want -> {taken, ms until the next token}
_PACE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local take = math.min(want, math.floor(tokens))
tokens = tokens - take
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 60)
local wait = 0
if take < want then wait = math.ceil((1 - tokens) / rate * 1000) end
return {take, wait}
"""

# KEYS: ewma key   ARGV: sample seconds, weight -> the new average
_OBSERVE = """
local old = redis.call('GET', KEYS[1])
local x, a = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = x
if old then v = tonumber(old) * (1 - a) + x * a end
redis.call('SET', KEYS[1], tostring(v), 'EX', 86400)
return tostring(v)
"""


def pace_burst(rate: float) -> float:
    # Half a second's worth (at least one), the submitter's wake-up granularity: each pass takes
    # what accrued since the last one, so a burst of work goes out at the paced rate.
    return max(1.0, rate / 2)


LIMIT_REASONS = {-1: "provider concurrency limit reached", -2: "provider rate limit reached"}
TYPICAL_CACHE_SECONDS = 5.0
EWMA_WEIGHT = 0.2


class RedisLimits:
    """Limits shared through Redis. Key names are namespaced so several deployments can share a Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        rate_per_minute: int,
        max_concurrency: int,
        slot_ttl: float = 3600.0,
        namespace: str = DEFAULT_NAMESPACE,
        pace_per_second: float = 0.0,
    ):
        self.r = client
        self.rate_per_minute = rate_per_minute
        self.max_concurrency = max_concurrency
        self.slot_ttl = slot_ttl
        self.namespace = namespace
        self.keys = keys = RedisKeys(namespace)
        self.k_rate, self.k_active, self.k_pace = keys.rate, keys.active, keys.pace
        self.k_breaker, self.k_tripped, self.k_probe = keys.breaker, keys.breaker_tripped, keys.breaker_probe
        self.k_failures, self.k_inference = keys.failures, keys.typical_inference
        self.pace_per_second = pace_per_second
        self._pace = self.r.register_script(_PACE)
        self._acquire = self.r.register_script(_ACQUIRE)
        self._acquire_many = self.r.register_script(_ACQUIRE_MANY)
        self._capacity = self.r.register_script(_CAPACITY)
        self._observe = self.r.register_script(_OBSERVE)
        self._typical: tuple[float, float | None] = (0.0, None)  # (read at, value): one GET per 5 s

    @classmethod
    def from_url(cls, url: str, **kw) -> RedisLimits:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True), **kw)

    def check_breaker(self) -> Gate:
        ttl = self.r.pttl(self.k_breaker)
        if ttl and ttl > 0:
            return Gate(ttl / 1000.0, f"circuit breaker open: {self.r.get(self.k_breaker) or 'provider refused'}")
        if self.r.exists(self.k_tripped):
            # Half-open: exactly one probe submission goes through; the rest wait for its outcome.
            if self.r.set(self.k_probe, "1", nx=True, px=30_000):
                return Gate(0.0, "circuit breaker half-open: probe", probe=True)
            return Gate(2.0, "circuit breaker half-open: waiting for the probe submission")
        return GO

    def acquire(self, token: str) -> Gate:
        status, wait_ms = self._acquire(
            keys=[self.k_rate, self.k_active],
            args=[60_000, self.rate_per_minute, self.max_concurrency, token, int(self.slot_ttl * 1000)],
        )
        if int(status) == 0:
            return GO
        reason = "provider concurrency limit reached" if int(status) == -1 else "provider rate limit reached"
        return Gate(int(wait_ms) / 1000.0, reason)

    def release(self, token: str) -> None:
        self.r.zrem(self.k_active, token)

    def trip_breaker(self, seconds: float, reason: str) -> None:
        pipe = self.r.pipeline()
        pipe.set(self.k_breaker, reason[:200], px=max(1, int(seconds * 1000)))
        pipe.set(self.k_tripped, "1")
        pipe.delete(self.k_probe)
        pipe.execute()

    def release_probe(self) -> None:
        self.r.delete(self.k_probe)

    def reset_breaker(self) -> None:
        if self.r.exists(self.k_tripped) or self.r.exists(self.k_breaker):
            self.r.delete(self.k_breaker, self.k_tripped, self.k_probe)

    def breaker_state(self) -> dict:
        ttl = self.r.pttl(self.k_breaker)
        return {
            "open": bool(ttl and ttl > 0),
            "seconds_left": max(0.0, (ttl or 0) / 1000.0),
            "reason": self.r.get(self.k_breaker),
            "tripped": bool(self.r.exists(self.k_tripped)),
            "active": self.r.zcard(self.k_active),
        }

    def remember_submission(self, job_id: str, prediction_id: str) -> None:
        # Seven days: as long as the provider keeps tasks listable.
        self.r.set(self.keys.journal(job_id), prediction_id, ex=7 * 24 * 3600)

    def recall_submission(self, job_id: str) -> str | None:
        return self.r.get(self.keys.journal(job_id))

    def breaker_wait(self) -> float:
        """Seconds the breaker stays open (0 when closed or half-open); consumes no probe."""
        ttl = self.r.pttl(self.k_breaker)
        return ttl / 1000.0 if ttl and ttl > 0 else 0.0

    def record_failure(self, *, threshold: int, window: float, open_seconds: float, reason: str) -> bool:
        pipe = self.r.pipeline()
        pipe.incr(self.k_failures)
        pipe.pexpire(self.k_failures, int(window * 1000), nx=True)
        pipe.exists(self.k_tripped)
        count, _, half_open = pipe.execute()
        # A failure while half-open (the probe failed) reopens at once.
        if (int(count) >= threshold or half_open) and not self.breaker_wait():
            self.r.delete(self.k_failures)
            self.trip_breaker(open_seconds, f"provider unavailable: {count} failures in {window:.0f}s ({reason})")
            return True
        return False

    def record_success(self) -> None:
        self.r.delete(self.k_failures)

    def once(self, key: str, ttl: float) -> bool:
        return bool(self.r.set(self.keys.once(key), "1", nx=True, px=max(1, int(ttl * 1000))))

    def forget(self, key: str) -> None:
        self.r.delete(self.keys.once(key))

    def capacity(self) -> Gate | int:
        room, status, wait_ms = self._capacity(keys=[self.k_rate, self.k_active], args=[60_000, self.rate_per_minute, self.max_concurrency])
        return int(room) if int(status) == 0 else Gate(int(wait_ms) / 1000.0, LIMIT_REASONS[int(status)])

    def acquire_many(self, tokens: list[str]) -> tuple[int, Gate]:
        if not tokens:
            return 0, GO
        granted, status, wait_ms = self._acquire_many(
            keys=[self.k_rate, self.k_active],
            args=[60_000, self.rate_per_minute, self.max_concurrency, int(self.slot_ttl * 1000), *tokens],
        )
        return int(granted), (GO if int(status) == 0 else Gate(int(wait_ms) / 1000.0, LIMIT_REASONS[int(status)]))

    def release_many(self, tokens: list[str]) -> None:
        if tokens:
            self.r.zrem(self.k_active, *tokens)

    def pace(self, want: int) -> tuple[int, float]:
        if self.pace_per_second <= 0 or want <= 0:
            return want, 0.0
        taken, wait_ms = self._pace(keys=[self.k_pace], args=[self.pace_per_second, pace_burst(self.pace_per_second), want])
        return int(taken), int(wait_ms) / 1000.0

    def observe_inference(self, seconds: float) -> None:
        value = float(self._observe(keys=[self.k_inference], args=[f"{seconds:.3f}", EWMA_WEIGHT]))
        self._typical = (time.monotonic(), value)

    def typical_inference(self) -> float | None:
        read_at, value = self._typical
        if time.monotonic() - read_at > TYPICAL_CACHE_SECONDS:
            raw = self.r.get(self.k_inference)
            value = float(raw) if raw else None
            self._typical = (time.monotonic(), value)
        return value


class MemoryLimits:
    """The same behaviour in one process, on an injectable clock (unit tests, single-process tools)."""

    def __init__(
        self,
        *,
        rate_per_minute: int = 10_000,
        max_concurrency: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        pace_per_second: float = 0.0,
    ):
        self.pace_per_second = pace_per_second
        self._tokens: tuple[float, float] | None = None  # (tokens, at)
        self.rate_per_minute = rate_per_minute
        self.max_concurrency = max_concurrency
        self.clock = clock
        self._lock = threading.Lock()
        self._stamps: list[float] = []
        self._active: set[str] = set()
        self._breaker_until = 0.0
        self._breaker_reason = ""
        self._tripped = False
        self._probe_taken = False
        self._probe_until = 0.0
        self._journal: dict[str, str] = {}
        self._failures: list[float] = []
        self._once: dict[str, float] = {}
        self._typical: float | None = None

    def check_breaker(self) -> Gate:
        with self._lock:
            now = self.clock()
            if now < self._breaker_until:
                return Gate(self._breaker_until - now, f"circuit breaker open: {self._breaker_reason}")
            if self._tripped:
                # Like the Redis probe key (30 s TTL): a probe that never reports back expires.
                if not self._probe_taken or now >= self._probe_until:
                    self._probe_taken = True
                    self._probe_until = now + 30.0
                    return Gate(0.0, "circuit breaker half-open: probe", probe=True)
                return Gate(2.0, "circuit breaker half-open: waiting for the probe submission")
            return GO

    def acquire(self, token: str) -> Gate:
        with self._lock:
            now = self.clock()
            self._stamps = [s for s in self._stamps if s > now - 60.0]
            if token not in self._active and len(self._active) >= self.max_concurrency:
                return Gate(1.0, "provider concurrency limit reached")
            if len(self._stamps) >= self.rate_per_minute:
                return Gate(max(0.05, self._stamps[0] + 60.0 - now), "provider rate limit reached")
            self._stamps.append(now)
            self._active.add(token)
            return GO

    def release(self, token: str) -> None:
        with self._lock:
            self._active.discard(token)

    def trip_breaker(self, seconds: float, reason: str) -> None:
        with self._lock:
            self._breaker_until = self.clock() + seconds
            self._breaker_reason = reason
            self._tripped = True
            self._probe_taken = False

    def release_probe(self) -> None:
        with self._lock:
            self._probe_taken = False

    def reset_breaker(self) -> None:
        with self._lock:
            self._breaker_until = 0.0
            self._tripped = False
            self._probe_taken = False

    def breaker_state(self) -> dict:
        with self._lock:
            left = max(0.0, self._breaker_until - self.clock())
            return {
                "open": left > 0,
                "seconds_left": left,
                "reason": self._breaker_reason or None,
                "tripped": self._tripped,
                "active": len(self._active),
            }

    def remember_submission(self, job_id: str, prediction_id: str) -> None:
        self._journal[job_id] = prediction_id

    def recall_submission(self, job_id: str) -> str | None:
        return self._journal.get(job_id)

    def breaker_wait(self) -> float:
        with self._lock:
            return max(0.0, self._breaker_until - self.clock())

    def record_failure(self, *, threshold: int, window: float, open_seconds: float, reason: str) -> bool:
        with self._lock:
            now = self.clock()
            self._failures = [t for t in self._failures if t > now - window] + [now]
            count = len(self._failures)
            trip = (count >= threshold or self._tripped) and now >= self._breaker_until
            if trip:
                self._failures = []
        if trip:
            self.trip_breaker(open_seconds, f"provider unavailable: {count} failures in {window:.0f}s ({reason})")
        return trip

    def record_success(self) -> None:
        with self._lock:
            self._failures = []

    def once(self, key: str, ttl: float) -> bool:
        with self._lock:
            now = self.clock()
            if self._once.get(key, 0.0) > now:
                return False
            self._once[key] = now + ttl
            return True

    def forget(self, key: str) -> None:
        with self._lock:
            self._once.pop(key, None)

    def capacity(self) -> Gate | int:
        with self._lock:
            now = self.clock()
            self._stamps = [s for s in self._stamps if s > now - 60.0]
            if len(self._active) >= self.max_concurrency:
                return Gate(1.0, LIMIT_REASONS[-1])
            if len(self._stamps) >= self.rate_per_minute:
                return Gate(max(0.05, self._stamps[0] + 60.0 - now), LIMIT_REASONS[-2])
            return min(self.max_concurrency - len(self._active), self.rate_per_minute - len(self._stamps))

    def acquire_many(self, tokens: list[str]) -> tuple[int, Gate]:
        for granted, token in enumerate(tokens):
            gate = self.acquire(token)
            if not gate.open:
                return granted, gate
        return len(tokens), GO

    def release_many(self, tokens: list[str]) -> None:
        with self._lock:
            self._active.difference_update(tokens)

    def observe_inference(self, seconds: float) -> None:
        with self._lock:
            old = self._typical
            self._typical = seconds if old is None else old * (1 - EWMA_WEIGHT) + seconds * EWMA_WEIGHT

    def typical_inference(self) -> float | None:
        with self._lock:
            return self._typical

    def pace(self, want: int) -> tuple[int, float]:
        if self.pace_per_second <= 0 or want <= 0:
            return want, 0.0
        with self._lock:
            now, burst = self.clock(), pace_burst(self.pace_per_second)
            tokens, at = self._tokens or (burst, now)
            tokens = min(burst, tokens + max(0.0, now - at) * self.pace_per_second)
            take = min(want, int(tokens))
            tokens -= take
            self._tokens = (tokens, now)
            return take, (0.0 if take == want else (1 - tokens) / self.pace_per_second)
