"""What the engine touches in the world, bundled for injection (`Deps`), and the production
wiring of it (`build_deps`, once per process); tests build their own Deps.
"""

from __future__ import annotations

import atexit
import os
import random
import socket
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
from worker.adapters.telemetry import Flusher, MemoryTotals, Recorder, RedisTotals, flush
from worker.adapters.tracing import NoTracing, Tracing, shared_tracing
from worker.adapters.wavespeed import WaveSpeedClient
from worker.config import Settings, get_settings
from worker.core.jobs import observe_jobs, utcnow
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
    # Metrics: events are summed in memory (`metrics`) and moved to `metrics_totals` (Redis in
    # production) by the worker process's flusher (start_telemetry); tests read the recorder.
    metrics: Recorder = field(default_factory=Recorder)
    metrics_totals: RedisTotals | MemoryTotals = field(default_factory=MemoryTotals)


def make_provider(
    settings: Settings,
    transport: httpx.BaseTransport | None = None,
    *,
    resolver: Resolver | None = None,
    on_call: Callable[[str, str], None] | None = None,
) -> WaveSpeedClient:
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
        on_call=on_call,
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
            recorder = Recorder(tenants=settings.metrics_tenant_set)
            sessions = session_factory(settings.database_url)
            observe_jobs(sessions, recorder)
            _deps = Deps(
                settings=settings,
                sessions=sessions,
                provider=make_provider(settings, on_call=recorder.provider_call),
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
                metrics=recorder,
                metrics_totals=RedisTotals(client),
            )
        return _deps


def worker_name() -> str:
    """This process's name in the heartbeats: host and pid (one per Celery pool process)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def telemetry_tick(deps: Deps, name: str | None = None) -> None:
    """One flush of the process's metrics and one heartbeat (what the flusher runs)."""
    flush(deps.metrics, deps.metrics_totals)
    deps.fleet.heartbeat(name or worker_name(), {"pid": os.getpid(), "host": socket.gethostname()})


_flusher: Flusher | None = None


def start_telemetry(deps: Deps) -> None:
    """In a worker process: flush metrics and beat the heart every EDIT_WORKER_METRICS_FLUSH_SECONDS
    (a daemon thread), and once more at exit. Idempotent per process."""
    global _flusher
    if _flusher is not None:  # the common case, without the lock
        return
    with _lock:
        if _flusher is not None:
            return
        _flusher = Flusher(lambda: telemetry_tick(deps), deps.settings.metrics_flush_seconds).start()
        atexit.register(stop_telemetry)
    telemetry_tick_safely(deps)


def telemetry_tick_safely(deps: Deps) -> None:
    try:
        telemetry_tick(deps)
    except Exception:  # Redis not up yet: the next tick tries again
        pass


def stop_telemetry() -> None:
    """The last flush (worker shutdown) and the end of the flusher."""
    global _flusher
    with _lock:
        flusher, _flusher = _flusher, None
    if flusher is not None:
        flusher.stop()


def reset_deps() -> None:
    """Forget the process's wiring (after fork, or when settings change in a test)."""
    global _deps, _flusher
    with _lock:
        if _deps is not None:
            _deps.provider.close()
        _deps = None
        flusher, _flusher = _flusher, None
    if flusher is not None and flusher.alive():
        flusher.stop()  # the old wiring's last counts (after fork the parent's thread is not running here)
