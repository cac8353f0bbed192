"""What the worker fleet shares besides the provider limits, through Redis (`MemoryFleet`: the same
in one process, for tests): `once` marks (wake-up de-duplication, per-node pass locks; `forget`
hands one back early), the model's typical inference time, one average for every worker, the
workers' heartbeats (who is alive: a hash of worker name -> pid, host, last seen), and how many jobs
the fleet copies out per second (adaptive pacing).
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
    # Worker heartbeats: each worker process says it is alive (info: pid, host), stamped with the
    # wall clock's epoch seconds as `seen`; workers_seen lists those seen within the last `within` s.
    def heartbeat(self, worker: str, info: dict) -> None: ...
    def workers_seen(self, within: float) -> dict[str, dict]: ...
    # Jobs copied out to S3, counted per wall-clock second fleet-wide (adaptive pacing), and the
    # busiest of the last `window` complete seconds (jobs per second; 0.0 when none were copied).
    def note_copied(self, count: int) -> None: ...
    def peak_copy_rate(self, window: int) -> float: ...


# The weight of a new sample in the inference-time average (an exponentially weighted mean).
EWMA_WEIGHT = 0.2
# A process re-reads the fleet's average at most this often (one GET per submit would add up).
TYPICAL_CACHE_SECONDS = 5.0
AVERAGE_KEPT_SECONDS = 86400
# A heartbeat older than this is pruned from the hash by the next heartbeat (a worker gone for good).
HEARTBEAT_KEPT_SECONDS = 86400
COPIED_KEPT_SECONDS = 300  # per-second copy counters live this long (the longest window read)

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

    def __init__(self, client: redis.Redis, *, namespace: str = DEFAULT_NAMESPACE, wall: Callable[[], float] = time.time):
        self.r = client
        self.wall = wall
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

    def note_copied(self, count: int) -> None:
        key = self.keys.copied(int(time.time()))
        pipe = self.r.pipeline(transaction=False)
        pipe.incrby(key, count)
        pipe.expire(key, COPIED_KEPT_SECONDS)
        pipe.execute()

    def peak_copy_rate(self, window: int) -> float:
        now = int(time.time())
        counts = self.r.mget([self.keys.copied(second) for second in range(now - window, now)])
        return float(max((int(c) for c in counts if c), default=0))

    def heartbeat(self, worker: str, info: dict) -> None:
        now = self.wall()
        stale = [name for name, seen in _seen_at(self.r.hgetall(self.keys.workers)).items() if seen < now - HEARTBEAT_KEPT_SECONDS]
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.keys.workers, worker, json.dumps({**info, "seen": now}))
        if stale:
            pipe.hdel(self.keys.workers, *stale)
        pipe.execute()

    def workers_seen(self, within: float) -> dict[str, dict]:
        return _within(self.r.hgetall(self.keys.workers), self.wall() - within)


def _decode(raw: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, value in raw.items():
        try:
            info = json.loads(value)
        except (ValueError, TypeError):
            continue
        if isinstance(info, dict) and isinstance(info.get("seen"), (int, float)):
            out[name.decode() if isinstance(name, bytes) else str(name)] = info
    return out


def _seen_at(raw: dict) -> dict[str, float]:
    return {name: float(info["seen"]) for name, info in _decode(raw).items()}


def _within(raw: dict, since: float) -> dict[str, dict]:
    return {name: info for name, info in _decode(raw).items() if float(info["seen"]) >= since}


class MemoryFleet:
    """The same in one process, on an injectable clock (unit tests, single-process tools)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.clock = clock
        self.wall = wall
        self._workers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._once: dict[str, float] = {}
        self._typical: float | None = None
        self._copied: dict[int, int] = {}

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

    def note_copied(self, count: int) -> None:
        with self._lock:
            second = int(self.clock())
            self._copied[second] = self._copied.get(second, 0) + count

    def peak_copy_rate(self, window: int) -> float:
        with self._lock:
            now = int(self.clock())
            return float(max((self._copied.get(second, 0) for second in range(now - window, now)), default=0))

    def heartbeat(self, worker: str, info: dict) -> None:
        with self._lock:
            self._workers[worker] = json.dumps({**info, "seen": self.wall()})

    def workers_seen(self, within: float) -> dict[str, dict]:
        with self._lock:
            return _within(dict(self._workers), self.wall() - within)
