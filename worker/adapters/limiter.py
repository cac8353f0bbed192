"""The provider's limits, shared by the fleet through Redis (`MemoryLimiter`: the same in one
process, for tests): a rate limit (a sliding minute), a concurrency limit (one slot per job at the
provider) and submission pacing (a token bucket). A refusal is a `Gate` saying how long to wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from worker.adapters.breaker import GO, Gate
from worker.adapters.redis_keys import DEFAULT_NAMESPACE, RedisKeys


class Limiter(Protocol):
    max_concurrency: int

    def acquire(self, token: str) -> Gate: ...  # a slot for one job: GO, or how long to wait
    # The batch submitter's forms: how many submits may start now (else how long to wait); slots
    # for several jobs in one round trip (a prefix of `tokens` is granted); hand many back.
    def capacity(self) -> Gate | int: ...
    def acquire_many(self, tokens: list[str]) -> tuple[int, Gate]: ...
    def release(self, token: str) -> None: ...
    def release_many(self, tokens: list[str]) -> None: ...
    def slots_held(self) -> int: ...  # concurrency slots held now, fleet-wide
    # Pacing (submit_pace_per_second, or `rate` when given: adaptive pacing's learned rate):
    # takes up to `want` tokens, answers how many it got and, if fewer, how long until the next one.
    def pace(self, want: int, rate: float | None = None) -> tuple[int, float]: ...


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


def pace_burst(rate: float) -> float:
    # Half a second's worth (at least one), the submitter's wake-up granularity: each pass takes
    # what accrued since the last one, so a burst of work goes out at the paced rate.
    return max(1.0, rate / 2)


LIMIT_REASONS = {-1: "provider concurrency limit reached", -2: "provider rate limit reached"}
RATE_WINDOW_MS = 60_000


def _refusal(status: int, wait_ms: int) -> Gate:
    return Gate(int(wait_ms) / 1000.0, LIMIT_REASONS[int(status)])


class RedisLimiter:
    """The limits in Redis (times from Redis itself). Key names are namespaced so several
    deployments can share one Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        rate_per_minute: int,
        max_concurrency: int,
        slot_ttl: float = 3600.0,
        pace_per_second: float = 0.0,
        namespace: str = DEFAULT_NAMESPACE,
    ):
        self.r = client
        self.rate_per_minute = rate_per_minute
        self.max_concurrency = max_concurrency
        self.slot_ttl = slot_ttl
        self.pace_per_second = pace_per_second
        keys = RedisKeys(namespace)
        self.k_rate, self.k_active, self.k_pace = keys.rate, keys.active, keys.pace
        self._acquire = client.register_script(_ACQUIRE)
        self._acquire_many = client.register_script(_ACQUIRE_MANY)
        self._capacity = client.register_script(_CAPACITY)
        self._pace = client.register_script(_PACE)

    def acquire(self, token: str) -> Gate:
        status, wait_ms = self._acquire(
            keys=[self.k_rate, self.k_active],
            args=[RATE_WINDOW_MS, self.rate_per_minute, self.max_concurrency, token, int(self.slot_ttl * 1000)],
        )
        return GO if int(status) == 0 else _refusal(status, wait_ms)

    def capacity(self) -> Gate | int:
        room, status, wait_ms = self._capacity(
            keys=[self.k_rate, self.k_active], args=[RATE_WINDOW_MS, self.rate_per_minute, self.max_concurrency]
        )
        return int(room) if int(status) == 0 else _refusal(status, wait_ms)

    def acquire_many(self, tokens: list[str]) -> tuple[int, Gate]:
        if not tokens:
            return 0, GO
        granted, status, wait_ms = self._acquire_many(
            keys=[self.k_rate, self.k_active],
            args=[RATE_WINDOW_MS, self.rate_per_minute, self.max_concurrency, int(self.slot_ttl * 1000), *tokens],
        )
        return int(granted), (GO if int(status) == 0 else _refusal(status, wait_ms))

    def release(self, token: str) -> None:
        self.r.zrem(self.k_active, token)

    def release_many(self, tokens: list[str]) -> None:
        if tokens:
            self.r.zrem(self.k_active, *tokens)

    def slots_held(self) -> int:
        return int(self.r.zcard(self.k_active))

    def pace(self, want: int, rate: float | None = None) -> tuple[int, float]:
        rate = self.pace_per_second if rate is None else rate
        if rate <= 0 or want <= 0:
            return want, 0.0
        taken, wait_ms = self._pace(keys=[self.k_pace], args=[rate, pace_burst(rate), want])
        return int(taken), int(wait_ms) / 1000.0


class MemoryLimiter:
    """The same limits in one process, on an injectable clock (unit tests, single-process tools)."""

    def __init__(
        self,
        *,
        rate_per_minute: int = 10_000,
        max_concurrency: int = 10_000,
        pace_per_second: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rate_per_minute = rate_per_minute
        self.max_concurrency = max_concurrency
        self.pace_per_second = pace_per_second
        self.clock = clock
        self._lock = threading.Lock()
        self._stamps: list[float] = []  # submissions in the last minute
        self._active: set[str] = set()
        self._bucket: tuple[float, float] | None = None  # pacing: (tokens, at)

    def _room(self, now: float) -> Gate | int:
        self._stamps = [s for s in self._stamps if s > now - 60.0]
        if len(self._active) >= self.max_concurrency:
            return Gate(1.0, LIMIT_REASONS[-1])
        if len(self._stamps) >= self.rate_per_minute:
            return Gate(max(0.05, self._stamps[0] + 60.0 - now), LIMIT_REASONS[-2])
        return min(self.max_concurrency - len(self._active), self.rate_per_minute - len(self._stamps))

    def acquire(self, token: str) -> Gate:
        with self._lock:
            now = self.clock()
            self._stamps = [s for s in self._stamps if s > now - 60.0]
            if token not in self._active and len(self._active) >= self.max_concurrency:
                return Gate(1.0, LIMIT_REASONS[-1])
            if len(self._stamps) >= self.rate_per_minute:
                return Gate(max(0.05, self._stamps[0] + 60.0 - now), LIMIT_REASONS[-2])
            self._stamps.append(now)
            self._active.add(token)
            return GO

    def capacity(self) -> Gate | int:
        with self._lock:
            return self._room(self.clock())

    def acquire_many(self, tokens: list[str]) -> tuple[int, Gate]:
        for granted, token in enumerate(tokens):
            gate = self.acquire(token)
            if not gate.go:
                return granted, gate
        return len(tokens), GO

    def release(self, token: str) -> None:
        with self._lock:
            self._active.discard(token)

    def release_many(self, tokens: list[str]) -> None:
        with self._lock:
            self._active.difference_update(tokens)

    def slots_held(self) -> int:
        with self._lock:
            return len(self._active)

    def pace(self, want: int, rate: float | None = None) -> tuple[int, float]:
        rate = self.pace_per_second if rate is None else rate
        if rate <= 0 or want <= 0:
            return want, 0.0
        with self._lock:
            now, burst = self.clock(), pace_burst(rate)
            tokens, at = self._bucket or (burst, now)
            tokens = min(burst, tokens + max(0.0, now - at) * rate)
            take = min(want, int(tokens))
            tokens -= take
            self._bucket = (tokens, now)
            return take, (0.0 if take == want else (1 - tokens) / rate)
