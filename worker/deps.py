"""What the pipeline touches in the world, bundled for injection: settings, database sessions,
the provider client, S3, the shared limits, a publisher for next steps, the clock and the RNG.

`build_deps()` wires the production versions once per process; tests build their own Deps.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Protocol

import httpx
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings, get_settings
from .db import session_factory
from .jobs import utcnow
from .limits import Limits, RedisLimits
from .storage import Storage
from .wavespeed import WaveSpeedClient


class Publisher(Protocol):
    def publish(self, step: str, job_id: str, *, countdown: float = 0.0, poll_seq: int | None = None) -> None: ...


@dataclass
class RecordingPublisher:
    """Collects what would have been sent (tests, dry runs)."""

    sent: list[tuple[str, str, float, int | None]] = field(default_factory=list)

    def publish(self, step: str, job_id: str, *, countdown: float = 0.0, poll_seq: int | None = None) -> None:
        self.sent.append((step, job_id, countdown, poll_seq))


@dataclass
class Deps:
    settings: Settings
    sessions: sessionmaker[Session]
    provider: WaveSpeedClient
    storage: Storage
    limits: Limits
    publisher: Publisher
    clock: Callable[[], datetime] = utcnow
    rng: random.Random = field(default_factory=random.Random)


def make_provider(settings: Settings, transport: httpx.BaseTransport | None = None) -> WaveSpeedClient:
    return WaveSpeedClient(
        settings.wavespeed_api_key,
        settings.wavespeed_base_url,
        transport=transport,
        timeout=httpx.Timeout(settings.http_timeout, connect=settings.http_connect_timeout),
    )


_lock = threading.Lock()
_deps: Deps | None = None


def build_deps(settings: Settings | None = None, publisher: Publisher | None = None) -> Deps:
    """The production wiring, one per process: one pooled httpx client, one boto3 client, one
    Redis connection pool — never one per task."""
    global _deps
    with _lock:
        if _deps is None:
            settings = settings or get_settings()
            if publisher is None:
                from .tasks import CeleryPublisher

                publisher = CeleryPublisher()
            _deps = Deps(
                settings=settings,
                sessions=session_factory(settings.database_url),
                provider=make_provider(settings),
                storage=Storage.from_settings(settings),
                limits=RedisLimits.from_url(
                    settings.limiter_redis_url,
                    rate_per_minute=settings.rate_limit_per_minute,
                    max_concurrency=settings.max_concurrency,
                    slot_ttl=settings.job_deadline_seconds,
                    pace_per_second=settings.submit_pace_per_second,
                ),
                publisher=publisher,
            )
        return _deps


def reset_deps() -> None:
    """Forget the process's wiring (after fork, or when settings change in a test)."""
    global _deps
    with _lock:
        if _deps is not None:
            _deps.provider.close()
        _deps = None
