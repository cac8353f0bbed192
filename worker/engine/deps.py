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
import redis
from sqlalchemy.orm import Session, sessionmaker

from worker.adapters.breaker import Breaker, RedisBreaker
from worker.adapters.database import session_factory
from worker.adapters.fleet import Fleet, RedisFleet
from worker.adapters.journal import Journal, RedisJournal
from worker.adapters.limiter import Limiter, RedisLimiter
from worker.adapters.redis_client import connect, require_supported
from worker.adapters.storage import Storage
from worker.adapters.tracing import NoTracing, Tracing, shared_tracing
from worker.adapters.wavespeed import WaveSpeedClient
from worker.config import Settings, get_settings
from worker.core.jobs import utcnow
from worker.core.steps import Publisher
from worker.core.validation import Resolver, output_url_guard


@dataclass
class Deps:
    """Everything a step needs from outside: settings, database sessions, the provider client, S3,
    what the fleet shares through Redis (the limiter, the breaker, the submission journal, the
    fleet's marks and averages), a publisher for next steps, the clock, the RNG and the tracer
    (off unless configured: adapters/tracing.py)."""

    settings: Settings
    sessions: sessionmaker[Session]
    provider: WaveSpeedClient
    storage: Storage
    limiter: Limiter
    breaker: Breaker
    journal: Journal
    fleet: Fleet
    publisher: Publisher
    clock: Callable[[], datetime] = utcnow
    rng: random.Random = field(default_factory=random.Random)
    tracing: Tracing = field(default_factory=NoTracing)


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
    Redis client (shared by the limiter, breaker, journal and fleet) — never one per task. Refuses
    a Redis older than 6.2 (UnsupportedRedis)."""
    global _deps
    with _lock:
        if _deps is None:
            settings = settings or get_settings()
            if publisher is None:
                from worker.engine.celery_app import celery_publisher

                publisher = celery_publisher()
            client = connect(settings.limiter_redis_url)
            try:
                require_supported(client)
            except redis.RedisError:
                pass  # not reachable now: every use of it copes with a Redis that is down
            _deps = Deps(
                settings=settings,
                sessions=session_factory(settings.database_url),
                provider=make_provider(settings),
                storage=Storage.from_settings(settings),
                limiter=RedisLimiter(
                    client,
                    rate_per_minute=settings.rate_limit_per_minute,
                    max_concurrency=settings.max_concurrency,
                    slot_ttl=settings.job_deadline_seconds,
                    pace_per_second=settings.submit_pace_per_second,
                ),
                breaker=RedisBreaker(client),
                journal=RedisJournal(client),
                fleet=RedisFleet(client),
                publisher=publisher,
                tracing=shared_tracing(settings),
            )
        return _deps


def reset_deps() -> None:
    """Forget the process's wiring (after fork, or when settings change in a test)."""
    global _deps
    with _lock:
        if _deps is not None:
            _deps.provider.close()
        _deps = None
