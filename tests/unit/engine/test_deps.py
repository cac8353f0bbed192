"""The production wiring (`build_deps`): one Redis client shared by the limiter, breaker, journal
and fleet, and a Redis older than 6.2 refused before anything runs on it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from worker.adapters.breaker import RedisBreaker
from worker.adapters.fleet import RedisFleet
from worker.adapters.journal import RedisJournal
from worker.adapters.limiter import RedisLimiter
from worker.adapters.telemetry import RedisTotals
from worker.core.jobs import OBSERVER
from worker.core.steps import RecordingPublisher
from worker.engine.deps import build_deps, reset_deps
from worker.errors import UnsupportedRedis


@pytest.fixture
def fake_redis() -> Iterator[Callable[[str], str]]:
    """`start(version)`: a socket that speaks just enough RESP to say it is that Redis version."""
    listeners: list[socket.socket] = []

    def start(version: str) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve(conn: socket.socket) -> None:
            with conn:
                while data := conn.recv(65536):
                    if b"INFO" in data.upper():
                        body = f"# Server\r\nredis_version:{version}\r\n".encode()
                        conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                    else:
                        conn.sendall(b"+OK\r\n")

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"redis://127.0.0.1:{listener.getsockname()[1]}/0"

    yield start
    for listener in listeners:
        listener.close()


@pytest.fixture
def wiring():
    reset_deps()
    yield
    reset_deps()


def test_a_redis_older_than_6_2_is_refused_when_the_deps_are_built(settings, fake_redis, wiring):
    old = settings.model_copy(update={"redis_url": fake_redis("6.0.16")})
    with pytest.raises(UnsupportedRedis, match=r"^Redis 6\.0\.16 is not supported: edit-worker needs Redis 6\.2 or newer$"):
        build_deps(old, RecordingPublisher())


def test_the_redis_parts_share_one_client(settings, fake_redis, wiring):
    deps = build_deps(settings.model_copy(update={"redis_url": fake_redis("6.2.14")}), RecordingPublisher())
    assert isinstance(deps.limiter, RedisLimiter) and isinstance(deps.breaker, RedisBreaker)
    assert isinstance(deps.journal, RedisJournal) and isinstance(deps.fleet, RedisFleet)
    assert deps.limiter.r is deps.breaker.r is deps.journal.r is deps.fleet.r


def test_a_redis_that_is_down_does_not_stop_the_wiring(settings, wiring):
    # Every use of Redis copes with it being down; the version is checked when it is reachable.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe closes
    deps = build_deps(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"}), RecordingPublisher())
    assert isinstance(deps.breaker, RedisBreaker)


def test_one_recorder_hears_the_transitions_and_provider_calls_and_flushes_to_the_shared_redis(settings, fake_redis, wiring):
    deps = build_deps(settings.model_copy(update={"redis_url": fake_redis("6.2.14")}), RecordingPublisher())

    assert deps.sessions.kw["info"][OBSERVER] is deps.metrics
    assert deps.provider.on_call == deps.metrics.provider_call
    assert isinstance(deps.metrics_totals, RedisTotals) and deps.metrics_totals.r is deps.fleet.r
