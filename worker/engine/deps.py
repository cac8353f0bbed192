"""What the engine touches in the world, bundled for injection (`Deps`), and the production
wiring of it (`build_deps`, once per process); tests build their own Deps.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from sqlalchemy.orm import Session, sessionmaker

from worker.adapters.database import session_factory
from worker.adapters.limits import Limits, RedisLimits
from worker.adapters.storage import Storage
from worker.adapters.wavespeed import WaveSpeedClient
from worker.config import Settings, get_settings
from worker.core.jobs import utcnow
from worker.core.steps import Publisher
from worker.core.validation import Resolver, output_url_guard


@dataclass
class Deps:
    """Everything a step needs from outside: settings, database sessions, the provider client, S3,
    the shared limits (Redis), a publisher for next steps, the clock and the RNG."""

    settings: Settings
    sessions: sessionmaker[Session]
    provider: WaveSpeedClient
    storage: Storage
    limits: Limits
    publisher: Publisher
    clock: Callable[[], datetime] = utcnow
    rng: random.Random = field(default_factory=random.Random)


def make_provider(settings: Settings, transport: httpx.BaseTransport | None = None, *, resolver: Resolver | None = None) -> WaveSpeedClient:
    """The provider client, its output downloads guarded: every hop must be a public address or
    a host the operator trusts (`resolver`: a DNS stand-in for tests)."""
    return WaveSpeedClient(
        settings.wavespeed_api_key,
        settings.wavespeed_base_url,
        transport=transport,
        timeout=httpx.Timeout(settings.http_timeout, connect=settings.http_connect_timeout),
        url_guard=output_url_guard(settings.trusted_output_hosts, **({"resolver": resolver} if resolver else {})),
        max_output_bytes=settings.max_output_bytes,
        download_timeout=settings.download_timeout,
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
                from worker.engine.celery_app import celery_publisher

                publisher = celery_publisher()
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
