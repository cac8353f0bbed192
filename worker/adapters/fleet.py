"""What the worker fleet shares besides the provider limits, through Redis (`MemoryFleet`: the same
in one process, for tests): `once` marks (wake-up de-duplication, per-node pass locks; `forget`
hands one back early), the model's typical inference time, one average for every worker, and each
worker's heartbeat (who is alive, for the console and the metrics).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from worker.adapters.redis_keys import DEFAULT_NAMESPACE, RedisKeys


class Fleet(Protocol):
    # At most one caller per name within ttl gets True (see redis_keys for the names); forget()
    # ends it early (a loop's per-node lock: `once` to take it, `forget` to hand it back).
    def once(self, name: str, ttl: float) -> bool: ...
    def forget(self, name: str) -> None: ...
    # The model's typical inference time (an average of what the provider reports), for the first poll.
    def observe_inference(self, seconds: float) -> None: ...
    def typical_inference(self) -> float | None: ...
    # Heartbeats: each worker process says it is alive (`info`: pid, host, …; `seen` is set here, in
    # epoch seconds); `workers_seen` answers the workers heard from within the last `within` seconds.
    def heartbeat(self, worker: str, info: dict) -> None: ...
    def workers_seen(self, within: float) -> dict[str, dict]: ...


# The weight of a new sample in the inference-time average (an exponentially weighted mean).
EWMA_WEIGHT = 0.2
# A process re-reads the fleet's average at most this often (one GET per submit would add up).
TYPICAL_CACHE_SECONDS = 5.0
AVERAGE_KEPT_SECONDS = 86400

# A heartbeat older than this is dropped from the hash when the next one is written (a worker gone
# for good leaves no field behind for ever).
HEARTBEAT_KEPT_SECONDS = 86400.0


def _beat(info: dict, seen: float) -> str:
    return json.dumps({**info, "seen": round(seen, 3)}, sort_keys=True, default=str)


def _seen_since(fields: dict, since: float) -> dict[str, dict]:
    """Decoded heartbeats newer than `since` (a field that does not parse is skipped)."""
    alive: dict[str, dict] = {}
    for name, raw in fields.items():
        try:
            info = json.loads(raw)
            seen = float(info["seen"])
        except (ValueError, TypeError, KeyError):
            continue
        if seen >= since:
            alive[name.decode() if isinstance(name, bytes) else str(name)] = info
    return alive


# KEYS: average key   ARGV: sample seconds, weight, keep seconds -> the new average
_OBSERVE = """
local old = redis.call('GET', KEYS[1])
local x, a = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = x
if old then v = tonumber(old) * (1 - a) + x * a end
redis.call('SET', KEYS[1], tostring(v), 'EX', tonumber(ARGV[3]))
return tostring(v)
"""


class RedisFleet:
    """`once` marks are SET NX with a TTL; the average is one key, read at most every 5 s."""

    def __init__(self, client: redis.Redis, *, namespace: str = DEFAULT_NAMESPACE):
        self.r = client
        self.keys = RedisKeys(namespace)
        self._observe = client.register_script(_OBSERVE)
        self._typical: tuple[float, float | None] = (-TYPICAL_CACHE_SECONDS - 1, None)  # (read at, value)

    def once(self, name: str, ttl: float) -> bool:
        return bool(self.r.set(self.keys.once(name), "1", nx=True, px=max(1, int(ttl * 1000))))

    def forget(self, name: str) -> None:
        self.r.delete(self.keys.once(name))

    def observe_inference(self, seconds: float) -> None:
        value = float(self._observe(keys=[self.keys.typical_inference], args=[f"{seconds:.3f}", EWMA_WEIGHT, AVERAGE_KEPT_SECONDS]))
        self._typical = (time.monotonic(), value)

    def typical_inference(self) -> float | None:
        read_at, value = self._typical
        if time.monotonic() - read_at > TYPICAL_CACHE_SECONDS:
            raw = self.r.get(self.keys.typical_inference)
            value = float(raw) if raw else None
            self._typical = (time.monotonic(), value)
        return value

    def heartbeat(self, worker: str, info: dict) -> None:
        now = time.time()
        self.r.hset(self.keys.workers, worker, _beat(info, now))
        # Rarely worth a round trip: drop fields of workers gone for a day.
        stale = [
            name for name, info in _seen_since(self.r.hgetall(self.keys.workers), 0).items() if info["seen"] < now - HEARTBEAT_KEPT_SECONDS
        ]
        if stale:
            self.r.hdel(self.keys.workers, *stale)

    def workers_seen(self, within: float) -> dict[str, dict]:
        return _seen_since(self.r.hgetall(self.keys.workers), time.time() - within)


class MemoryFleet:
    """The same in one process, on an injectable clock (unit tests, single-process tools)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.clock = clock
        self.wall_clock = wall_clock  # heartbeats carry epoch seconds, like RedisFleet's
        self._lock = threading.Lock()
        self._once: dict[str, float] = {}
        self._typical: float | None = None
        self._workers: dict[str, str] = {}

    def once(self, name: str, ttl: float) -> bool:
        with self._lock:
            now = self.clock()
            if self._once.get(name, 0.0) > now:
                return False
            self._once[name] = now + ttl
            return True

    def forget(self, name: str) -> None:
        with self._lock:
            self._once.pop(name, None)

    def observe_inference(self, seconds: float) -> None:
        with self._lock:
            old = self._typical
            self._typical = seconds if old is None else old * (1 - EWMA_WEIGHT) + seconds * EWMA_WEIGHT

    def typical_inference(self) -> float | None:
        with self._lock:
            return self._typical

    def heartbeat(self, worker: str, info: dict) -> None:
        with self._lock:
            self._workers[worker] = _beat(info, self.wall_clock())

    def workers_seen(self, within: float) -> dict[str, dict]:
        with self._lock:
            return _seen_since(dict(self._workers), self.wall_clock() - within)
