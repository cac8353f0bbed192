#!/usr/bin/env python
"""Scale benchmark: the edit worker against a blocking baseline, on the real stack, in one run.

    python bench/scale.py --jobs 2000 --latency 10 --workers 1 --concurrency 4 --baseline-seconds 120 \
        --env EDIT_WORKER_SUBMIT_PACE_PER_SECOND=120
    python bench/scale.py --jobs 1000 --latency 0 --baseline-seconds 0          # max sustained jobs/s
    python bench/scale.py --jobs 1000 --latency 0 --workers 1,2,4 --baseline-seconds 0
    python bench/scale.py --jobs 1000 --latency 0 --profile                     # + py-spy of worker 0
    python bench/scale.py --jobs 2000 --latency 10 --concurrency 4 --baseline-seconds 0 --webhooks \
        --json-out bench/data/lag-2000x10-webhooks.json                         # provider webhooks; figures for bench/plot.py

Starts on 127.0.0.1 (each a child process in its own process group, always torn down): PostgreSQL
(throwaway cluster, pg_stat_statements preloaded), redis-server, an S3 server (rclone when installed, else moto;
--s3), the sandbox provider with `--latency L`. Then, per entry of --workers:

1. this worker: W `edit-worker worker --concurrency C` processes + one `edit-worker beat`, jobs put in
   through the producer API (`submit_edit_many`: validated, inserted and published in batches);
   drain time = first insert -> last terminal job (from the rows' created_at / finished_at);
2. the blocking baseline (bench/baseline.py: submit, then time.sleep-poll, then copy to S3) with the
   same W and C, time-boxed by --baseline-seconds (0 skips it).

Measured per run: jobs/s (and the steady rate between the 10th and 90th percentile completion),
per-job overhead = (finished_at - created_at) - latency (p50/p95/p99), lag behind the provider =
finished_at - (the sandbox task's created_at + latency), i.e. how long after the provider had the
result the job was done (p50/p95/p99), predictions in flight (jobs in
`processing`, sampled every 0.5 s; plus the exact sweep-line maximum from job_events), provider
calls per job (sandbox counters), worker CPU-seconds per job and the CPU of every other component
(psutil over each process tree), peak RSS per worker process, DB statements per job
(pg_stat_statements, split by role: every process kind connects as its own PostgreSQL role).

Results go to stdout (a table, then the same as markdown for bench/RESULTS.md) and to
bench/runs/<stamp>-<label>/ (result.json, service logs, profiles). bench/runs/ is gitignored.

Only public entry points of the product are used (`python -m worker.cli worker|beat` through
worker/local.py, `worker.producer.submit_edit_many`), so the harness measures whatever the product
does today; --env K=V and --worker-arg pass knobs through to evaluate design changes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from worker.config import settings_from_env  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import admission  # noqa: E402  # bench/admission.py: the producer-side measurements

from worker.devtools import local  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")
STATES = ("queued", "submitting", "processing", "uploading", "succeeded", "failed", "cancelled")
HUGE = "1000000000"
# Each kind of process connects as its own role, so pg_stat_statements can tell them apart.
ROLES = {"worker": "ew_worker", "beat": "ew_beat", "producer": "ew_producer", "monitor": "ew_monitor", "baseline": "ew_baseline"}
RUNS_DIR = ROOT / "bench" / "runs"


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack(local.StackURLs):
    workdir: Path
    services: list[local.Service] = field(default_factory=list)
    redis: local.Service | None = None
    s3: local.Service | None = None
    sandbox: local.Service | None = None
    postgres: local.Service | None = None
    pg_port: int = 0
    pg_stat_statements: bool = False

    def pg_url(self, db: str = "postgres", role: str = "postgres", driver: bool = True) -> str:
        scheme = "postgresql+psycopg" if driver else "postgresql"
        return f"{scheme}://{role}@127.0.0.1:{self.pg_port}/{db}"

    def start(self, args) -> Stack:
        self.redis = self._start(local.redis(self.workdir / "redis"))
        self.s3 = self._start(local.s3_persistent(self.workdir) if args.s3 == "rclone" else local.s3(self.workdir))
        self.sandbox = self._start(local.sandbox(self.workdir, latency=args.latency, outputs="flat"))
        self._start_postgres()
        return self

    def _start(self, service: local.Service) -> local.Service:
        self.services.append(service)  # before start: a half-started service is still stopped
        service.start()
        return service

    def _start_postgres(self) -> None:
        pg_dir = Path(tempfile.mkdtemp(prefix="edit-worker-scale-pg-"))
        for preload in (True, False):
            service = local.postgres(pg_dir)
            if preload:
                # Built here rather than in worker/local.py: only the benchmark wants statement stats.
                service.argv += [
                    "-c",
                    "shared_preload_libraries=pg_stat_statements",
                    "-c",
                    "pg_stat_statements.max=10000",
                    "-c",
                    "pg_stat_statements.track_utility=on",
                ]
            try:
                self.postgres = self._start(service)
            except RuntimeError as exc:
                log(f"PostgreSQL with pg_stat_statements did not start ({str(exc)[:200]}); retrying without")
                service.stop()
                self.services.remove(service)
                continue
            self.pg_port = service.port
            local.wait_for_database(self.pg_url())
            break
        import psycopg

        with psycopg.connect(self.pg_url(driver=False), autocommit=True) as conn:
            for role in ROLES.values():
                # A throwaway cluster: superuser roles keep the schema's grants out of the way.
                conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                conn.execute("SELECT pg_stat_statements_reset()")
                self.pg_stat_statements = True
            except psycopg.Error as exc:
                log(f"pg_stat_statements unavailable ({exc}); DB load will be counted as transactions")

    def stop(self) -> None:
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception as exc:  # keep tearing down the rest
                log(f"stopping {service.name} failed: {exc}")
        if self.postgres is not None:
            shutil.rmtree(self.postgres.log_path.parent, ignore_errors=True)


def _wait_for_log(service: local.Service, needle: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in service.log_tail(200_000):
            return
        if not service.running:
            raise RuntimeError(f"{service.name} exited before it was ready:\n{service.log_tail(3000)}")
        time.sleep(0.2)
    raise RuntimeError(f"{service.name} not ready after {timeout:.0f}s:\n{service.log_tail(3000)}")


# --- sampling: processes and the database ------------------------------------------------------


class ProcGroup:
    """CPU and memory of one or more process trees (a Celery worker = main process + pool children)."""

    def __init__(self, name: str, roots: list[int]):
        self.name = name
        self.roots = roots
        self.cpu: dict[tuple[int, float], list[float]] = {}  # (pid, create_time) -> [at start, last seen]
        self.peak_proc_rss = 0
        self.peak_tree_rss = 0
        self.rss_series: list[tuple[float, int, int]] = []  # (t, tree total, largest process)

    def processes(self) -> list[psutil.Process]:
        found = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                found.append(root)
                found.extend(root.children(recursive=True))
            except psutil.Error:
                pass
        return found

    def sample(self, now: float, *, first: bool = False) -> None:
        total = largest = 0
        for proc in self.processes():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss = proc.memory_info().rss
                    key = (proc.pid, proc.create_time())
            except psutil.Error:
                continue
            used = times.user + times.system
            if key not in self.cpu:
                # Seen at the start: count from now. Born later: everything it used is in the window.
                self.cpu[key] = [used if first else 0.0, used]
            else:
                self.cpu[key][1] = used
            total += rss
            largest = max(largest, rss)
        self.peak_tree_rss = max(self.peak_tree_rss, total)
        self.peak_proc_rss = max(self.peak_proc_rss, largest)
        self.rss_series.append((now, total, largest))

    def cpu_seconds(self) -> float:
        return sum(last - start for start, last in self.cpu.values())


class Sampler(threading.Thread):
    """Every `interval`: process CPU/RSS of each group, and a count of rows by state."""

    def __init__(self, interval: float, groups: list[ProcGroup], count_sql: str | None, monitor_url: str | None):
        super().__init__(daemon=True, name="sampler")
        self.interval = interval
        self.groups = groups
        self.count_sql = count_sql
        self.monitor_url = monitor_url
        self._halt = threading.Event()
        self._conn = None
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.count_series: list[tuple[float, dict[str, int]]] = []
        self.max_processing = 0
        self.errors = 0

    def prime(self) -> None:
        now = time.time()
        for group in self.groups:
            group.sample(now, first=True)
        self._sys0 = psutil.cpu_times()
        self._t0 = now

    def _count(self) -> dict[str, int]:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.monitor_url, autocommit=True, connect_timeout=5)
        return {str(state): int(n) for state, n in self._conn.execute(self.count_sql).fetchall()}

    def sample_once(self) -> None:
        now = time.time()
        for group in self.groups:
            group.sample(now)
        if self.count_sql:
            try:
                counts = self._count()
            except Exception:
                self.errors += 1
                self._conn = None
                return
            with self.lock:
                self.counts = counts
                self.count_series.append((now, counts))
                self.max_processing = max(self.max_processing, counts.get("processing", 0))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample_once()

    def finish(self) -> dict:
        self._halt.set()
        self.join(timeout=30)
        self.sample_once()
        if self._conn is not None:
            self._conn.close()
        sys1 = psutil.cpu_times()
        wall = time.time() - self._t0
        busy = (sum(sys1) - sys1.idle - getattr(sys1, "iowait", 0)) - (sum(self._sys0) - self._sys0.idle - getattr(self._sys0, "iowait", 0))
        return {
            "wall": wall,
            "system_busy": busy,
            "cpus": psutil.cpu_count(),
            "util_pct": 100.0 * busy / max(wall * psutil.cpu_count(), 1e-9),
        }

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


def component_groups(stack: Stack, workers: list[local.Service], beat: local.Service | None) -> list[ProcGroup]:
    groups = [ProcGroup("workers", [w.process.pid for w in workers])]
    if beat is not None:
        groups.append(ProcGroup("beat", [beat.process.pid]))
    for name, service in (("postgres", stack.postgres), ("redis", stack.redis), ("s3", stack.s3), ("sandbox", stack.sandbox)):
        groups.append(ProcGroup(name, [service.process.pid]))
    harness = ProcGroup("harness", [])
    harness.processes = lambda: [psutil.Process()]  # only this process: producer + sampler
    groups.append(harness)
    return groups


# --- database statistics -----------------------------------------------------------------------


class DbStats:
    def __init__(self, stack: Stack, db: str):
        self.stack = stack
        self.db = db
        self._xact0: int | None = None

    def _conn(self):
        import psycopg

        return psycopg.connect(self.stack.pg_url(driver=False), autocommit=True)

    def reset(self) -> None:
        with self._conn() as conn:
            if self.stack.pg_stat_statements:
                conn.execute("SELECT pg_stat_statements_reset()")
            self._xact0 = self._xacts(conn)

    def _xacts(self, conn) -> int:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (self.db,)).fetchone()
        return int(row[0]) if row else 0

    def collect(self) -> dict:
        with self._conn() as conn:
            if not self.stack.pg_stat_statements:
                time.sleep(1.0)  # cumulative stats are flushed about once a second
                return {"kind": "transactions", "by_role": {"all (incl. monitor)": self._xacts(conn) - (self._xact0 or 0)}, "top": []}
            rows = conn.execute(
                "SELECT r.rolname, sum(s.calls)::bigint FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
                "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s GROUP BY r.rolname",
                (self.db,),
            ).fetchall()
            by_role = {name: int(calls) for name, calls in rows}
            top = conn.execute(
                "SELECT r.rolname, s.calls::bigint, round(s.total_exec_time::numeric, 1), "
                "left(regexp_replace(s.query, '\\s+', ' ', 'g'), 140) FROM pg_stat_statements s "
                "JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid "
                "WHERE d.datname = %s AND r.rolname <> %s ORDER BY s.calls DESC LIMIT 12",
                (self.db, ROLES["monitor"]),
            ).fetchall()
        return {
            "kind": "statements",
            "by_role": by_role,
            "top": [{"role": role, "calls": int(calls), "exec_ms": float(ms), "query": query} for role, calls, ms, query in top],
        }


# --- helpers -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def steady_rate(finish_times: list[float]) -> float | None:
    """Completions per second between the 10th and 90th percentile completion (no ramp-up/tail)."""
    if len(finish_times) < 20:
        return None
    ordered = sorted(finish_times)
    lo, hi = int(len(ordered) * 0.1), int(len(ordered) * 0.9)
    span = ordered[hi] - ordered[lo]
    return (hi - lo) / span if span > 0 else None


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1]))
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


_DB_TZ = timezone.utc


def epoch(value) -> float:
    # The schema's timestamps are WITHOUT time zone: PostgreSQL stored them in the server's TimeZone.
    if value.tzinfo is None:
        value = value.replace(tzinfo=_DB_TZ)
    return value.timestamp()


def provider_created(stack: Stack) -> dict[str, float]:
    """prompt -> when the sandbox created the provider task (wall clock, ms). Prompts are unique per run."""
    stats = httpx.get(f"{stack.sandbox_url}/_sandbox/stats", timeout=120).json()
    return {
        task["prompt"]: datetime.fromisoformat(task["created_at"].replace("Z", "+00:00")).timestamp() for task in stats.get("tasks", [])
    }


def sandbox_counters(stack: Stack) -> dict:
    stats = httpx.get(f"{stack.sandbox_url}/_sandbox/stats", timeout=60).json()
    return {k: stats.get(k, 0) for k in ("submissions", "submit_requests", "result_requests", "downloads", "cancels", "list_requests")}


def reset_world(stack: Stack, latency: float) -> None:
    import redis as redis_lib

    redis_lib.Redis.from_url(stack.broker_url).flushall()
    httpx.post(f"{stack.sandbox_url}/_sandbox/reset", timeout=30).raise_for_status()
    httpx.put(
        f"{stack.sandbox_url}/_sandbox/config",
        json={
            "latency": latency,
            "fail_rate": 0.0,
            "submit_error_rate": 0.0,
            "result_error_rate": 0.0,
            "slow_submit_rate": 0.0,
            "download_fail_rate": 0.0,
            "outage": False,
            "auth_failure": False,
        },
        timeout=30,
    ).raise_for_status()


def make_bucket(stack: Stack, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=bucket)


def base_env(stack: Stack, args, bucket: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EDIT_WORKER_", "WAVESPEED_", "S3_", "AWS_", "DATABASE_URL", "CELERY_"))
    }
    env.update(
        {
            "PYTHONPATH": str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
            "PYTHONUNBUFFERED": "1",
            "CELERY_BROKER_URL": stack.broker_url,
            "S3_ENDPOINT_URL": stack.s3_url,
            "S3_BUCKET": bucket,
            "S3_PREFIX": "edits",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "WAVESPEED_API_KEY": "sandbox-key",
            "WAVESPEED_BASE_URL": stack.sandbox_url,
            # The account limiter must not be what bounds the benchmark.
            "EDIT_WORKER_RATE_LIMIT_PER_MINUTE": HUGE,
            "EDIT_WORKER_MAX_CONCURRENCY": HUGE,
        }
    )
    # The deployment's guess of the model's inference time, used until the worker has learned it
    # from what the provider reports (adaptive_first_poll).
    env["EDIT_WORKER_FIRST_POLL_DELAY"] = f"{args.latency:g}"
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


# --- provider webhooks (--webhooks) ---------------------------------------------------------------

WEBHOOK_SECRET = "whsec_" + "c2NhbGUtYmVuY2gtd2ViaG9vay1zZWNyZXQ="  # any whsec_<base64>: a throwaway stack


def webhook_env(stack: Stack, args, env: dict[str, str]) -> int | None:
    """With --webhooks: the provider calls each job's own signed webhook URL on `edit-worker api`
    (as tests/integration/test_webhooks.py sets it up), so a finished prediction is copied at once
    instead of at its next poll. Adds the settings to `env`, tells the sandbox the secret, and
    answers the API's port (None without --webhooks)."""
    if not getattr(args, "webhooks", False):
        return None
    port = local.free_port()
    env["WAVESPEED_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    env["EDIT_WORKER_WEBHOOK_URL"] = f"http://127.0.0.1:{port}/webhooks/wavespeed"
    httpx.put(f"{stack.sandbox_url}/_sandbox/config", json={"webhook_secret": WEBHOOK_SECRET}, timeout=30).raise_for_status()
    return port


def start_webhook_api(port: int | None, env: dict[str, str], outdir: Path, label: str) -> local.Service | None:
    if port is None:
        return None
    api = local.Service(
        f"{label}-api",
        [sys.executable, "-m", "worker.cli", "api", "--port", str(port)],
        port,
        outdir / f"{label}-api.log",
        env=env,
        cwd=str(outdir),
    )
    return api.start()


# --- readability: the busiest process, and the run as JSON -------------------------------------

# Processes that are the benchmark's own stand-ins, not the product: when one of them is near a
# full core, it (not the worker) may be what bounds the run.
HARNESS = ("postgres", "redis", "s3", "sandbox", "harness")
NEAR_FULL_CORE = 85.0  # % of one core


def busiest_processes(groups: list[ProcGroup]) -> dict[str, dict]:
    """Per component: its busiest single process (CPU-seconds in the window, and its pid)."""
    out = {}
    for g in groups:
        if not g.cpu:
            continue
        (pid, _), (start, last) = max(g.cpu.items(), key=lambda kv: kv[1][1] - kv[1][0])
        out[g.name] = {"pid": pid, "cpu_s": last - start, "processes": len(g.cpu)}
    return out


def busiest_line(r: dict) -> str:
    """One line: the busiest process by CPU % of a core, and any harness process near a full core."""
    wall = max(r["system"]["wall"], 1e-9)
    busy = {name: 100.0 * b["cpu_s"] / wall for name, b in r.get("busiest", {}).items()}
    if not busy:
        return f"{r['label']}: busiest process: unknown"
    top = max(busy, key=busy.__getitem__)
    line = f"{r['label']}: busiest process: {top} (pid {r['busiest'][top]['pid']}) {busy[top]:.0f}% of a core"
    hot = [f"{name} {pct:.0f}%" for name, pct in sorted(busy.items(), key=lambda kv: -kv[1]) if name in HARNESS and pct >= NEAR_FULL_CORE]
    if hot:
        line += f"; WARNING harness near a full core: {', '.join(hot)} (the harness, not the worker, may bound this run)"
    else:
        line += f"; no harness process near a full core (>= {NEAR_FULL_CORE:.0f}%)"
    return line


def write_json_out(path: str, command: str, args, results: list[dict]) -> None:
    """--json-out: the run's figures (what bench/plot.py reads), without the long time series."""
    slim = [{k: v for k, v in r.items() if k not in ("rss_series_mb", "state_series", "profile")} for r in results]
    doc = {
        "command": command,
        "code": CODE_VERSION,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": psutil.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30)},
        "args": {k: v for k, v in vars(args).items() if k != "workers_list"},
        "results": slim,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    log(f"figures written to {path}")


# --- profiling ---------------------------------------------------------------------------------


class Profiler(threading.Thread):
    """py-spy on one worker's process tree (main + pool children), three recordings at once, without
    pausing the target: GIL-holding samples (~ Python CPU, raw), wall-clock samples incl. idle/waiting
    threads (raw + a flamegraph SVG)."""

    def __init__(self, pid: int, outdir: Path, delay: float, seconds: float, rate: int):
        super().__init__(daemon=True, name="profiler")
        self.pid, self.outdir, self.delay, self.seconds, self.rate = pid, outdir, delay, seconds, rate
        self.procs: list[subprocess.Popen] = []
        self._halt = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        spy = shutil.which("py-spy")
        if not spy:
            self.error = "py-spy not installed (pip install py-spy)"
            return
        if self._halt.wait(self.delay):
            return
        self.outdir.mkdir(parents=True, exist_ok=True)
        common = [
            spy,
            "record",
            "--pid",
            str(self.pid),
            "--subprocesses",
            "--nonblocking",
            "--duration",
            str(int(self.seconds)),
            "--rate",
            str(self.rate),
        ]
        # --gil: only samples holding the GIL, i.e. running Python (a thread blocked in a socket read
        # releases it; without --gil py-spy counts such syscalls as active). --idle: wall clock.
        plans = [
            ("cpu.raw", ["--format", "raw", "--gil"]),
            ("wall.raw", ["--format", "raw", "--idle"]),
            ("wall.svg", ["--format", "flamegraph", "--idle"]),
        ]
        for name, extra in plans:
            log_file = open(self.outdir / f"{name}.log", "wb")
            self.procs.append(
                subprocess.Popen(
                    [*common, *extra, "--output", str(self.outdir / name)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log_file.close()
        deadline = time.monotonic() + self.seconds + 60
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.error = "py-spy did not finish in time"
        self.stop()

    def stop(self) -> None:
        self._halt.set()
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")

# Leaf-most frame from one of these libraries decides a sample's category (stdlib frames such as
# socket/select/ssl are skipped, so a wait is charged to the library that waits).
_CATEGORIES = [
    ("DB (sqlalchemy/psycopg)", ("sqlalchemy/", "psycopg/", "psycopg_binary/", "psycopg_pool/")),
    ("S3 (boto3/botocore)", ("botocore/", "boto3/", "s3transfer/", "urllib3/")),
    ("provider HTTP (httpx)", ("httpx/", "httpcore/", "h11/")),
    ("broker (kombu)", ("kombu/", "amqp/")),
    ("redis", ("redis/",)),
    ("logging", ("logging/",)),
    ("json/serialization", ("json/",)),
    ("celery/billiard", ("celery/", "billiard/", "vine/", "click/")),
    ("edit-worker code", ("worker/", "models/")),
]


def _parse_raw(path: Path) -> list[tuple[str, list[str], int]]:
    samples = []
    if not path.exists():
        return samples
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        # --subprocesses nests prefixes: "process <root>:...;process <child>:...;frame;frame"
        process = ""
        while parts and parts[0].startswith("process "):
            process = parts.pop(0)
        samples.append((process, parts, int(count)))
    return samples


def _frame_key(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    return (match["func"], match["file"]) if match else (frame, "")


def _category(frames: list[str]) -> str:
    files = [_frame_key(f)[1] for f in frames]
    for file in reversed(files):
        for name, prefixes in _CATEGORIES:
            if any(file.startswith(p) or f"/{p}" in file for p in prefixes):
                if name == "redis":
                    if any(f.startswith(("kombu/", "celery/backends")) for f in files):
                        return "broker (kombu)"
                    return "redis (limiter/breaker)"
                return name
    return "other (interpreter/stdlib)"


def _process_roles(samples: list[tuple[str, list[str], int]]) -> dict[str, str]:
    """Tell the processes of a worker tree apart by what their stacks run (pids and the tree's shape
    are the product's business: e.g. a supervisor process above Celery's main process)."""
    files: dict[str, set[str]] = defaultdict(set)
    for process, frames, _ in samples:
        files[process].update(f"{func} ({file})" for func, file in map(_frame_key, frames))
    roles = {}
    for process, seen in files.items():
        if any("workloop (billiard/pool.py)" in name for name in seen):  # Worker.workloop: a prefork child
            roles[process] = "pool children"
        elif any("(celery/worker/" in name for name in seen):
            roles[process] = "celery main (consumer)"
        else:
            roles[process] = "other (e.g. supervisor)"
    return roles


def analyse_profile(outdir: Path) -> dict:
    report: dict = {}
    for kind in ("cpu", "wall"):
        samples = _parse_raw(outdir / f"{kind}.raw")
        roles = _process_roles(_parse_raw(outdir / "wall.raw") + samples)
        background = 0
        if kind == "wall":
            # Wall clock: only each process's main thread (where a prefork child runs its task).
            # Helper threads (e.g. a poller's HTTP thread pool) sit idle most of the time and would
            # drown the picture; their work still shows in the GIL-holding samples.
            kept = [s for s in samples if not (s[1] and "_bootstrap (threading.py" in s[1][0])]
            background = sum(n for _, _, n in samples) - sum(n for _, _, n in kept)
            samples = kept
        total = sum(n for _, _, n in samples) or 1
        by_role: dict[str, Counter] = defaultdict(Counter)
        own: Counter = Counter()
        inclusive: Counter = Counter()  # pool children only: where the task slots spend their time
        pool_total = 0
        for process, frames, n in samples:
            role = roles.get(process, "other (e.g. supervisor)")
            by_role[role][_category(frames)] += n
            if frames:
                func, file = _frame_key(frames[-1])
                own[f"{func} ({file})"] += n
            if role == "pool children":
                pool_total += n
                for key in {f"{a} ({b})" for a, b in map(_frame_key, frames)}:
                    inclusive[key] += n
        report[kind] = {
            "samples": total,
            "background_thread_samples": background,
            # Per role, as a share of that role's own samples (the main process and the pool children differ).
            "by_role": {
                role: {
                    "share": round(100.0 * sum(counts.values()) / total, 1),
                    "categories": {cat: round(100.0 * n / max(sum(counts.values()), 1), 1) for cat, n in counts.most_common()},
                }
                for role, counts in sorted(by_role.items(), reverse=True)
            },
            "top_own": [(name, round(100.0 * n / total, 1)) for name, n in own.most_common(15)],
            "top_inclusive_pool": [(name, round(100.0 * n / max(pool_total, 1), 1)) for name, n in inclusive.most_common(150)],
        }
    return report


def print_profile(report: dict, outdir: Path) -> str:
    lines = [f"profile (py-spy, worker 0 tree; files in {outdir.relative_to(ROOT) if outdir.is_relative_to(ROOT) else outdir})"]
    for kind, title in (
        ("cpu", "GIL-holding samples (~ Python CPU), all threads"),
        ("wall", "wall-clock samples (incl. idle/waiting), main threads"),
    ):
        data = report.get(kind)
        if not data or data["samples"] <= 1:
            lines.append(f"  {title}: no samples")
            continue
        extra = (
            f" (+{data['background_thread_samples']} samples of helper threads, left out)" if data.get("background_thread_samples") else ""
        )
        lines.append(f"  {title}: {data['samples']} samples{extra}")
        for role, info in data["by_role"].items():
            lines.append(
                f"    {role} ({info['share']}% of samples): " + ", ".join(f"{cat} {pct}%" for cat, pct in info["categories"].items())
            )
    wall = report.get("wall")
    if wall and wall["samples"] > 1:
        # Where the product's own steps spend their (wall) time, inclusive of everything they call.
        ours = [(name, pct) for name, pct in wall["top_inclusive_pool"] if "(worker/" in name and "(worker/cli.py)" not in name][:12]
        if ours:
            lines.append("  edit-worker functions, inclusive share of the pool children's wall time (the rest: waiting for work):")
            lines += [f"    {pct:5.1f}%  {name}" for name, pct in ours]
    cpu = report.get("cpu")
    if cpu and cpu["samples"] > 1:
        lines.append("  top 15 functions by own time in GIL-holding samples (% of those samples):")
        for name, pct in cpu["top_own"]:
            lines.append(f"    {pct:5.1f}%  {name}")
    text = "\n".join(lines)
    print(text)
    return text


# --- the edit worker phase ---------------------------------------------------------------------


def run_edit_worker(stack: Stack, args, workers_n: int, label: str, outdir: Path) -> dict:
    from sqlalchemy import text

    from worker.adapters.database import get_engine, migrate
    from worker.engine.celery_app import make_app
    from worker.engine.publisher import CeleryPublisher

    db = f"bench_{label}".replace("-", "_")
    bucket = f"bench-{label}-{uuid.uuid4().hex[:6]}".replace("_", "-").lower()
    local.create_database(stack.pg_url(), db)
    migrate(stack.pg_url(db))
    reset_world(stack, args.latency)
    make_bucket(stack, bucket)
    env = base_env(stack, args, bucket)
    api_port = webhook_env(stack, args, env)
    producer_env = {**env, "DATABASE_URL": stack.pg_url(db, ROLES["producer"])}
    settings = settings_from_env(producer_env)
    image = outdir / "input.png"
    if not image.exists():
        from PIL import Image

        Image.new("RGB", (64, 64), (10, 120, 200)).save(image)
    items = [{"image": str(image), "prompt": f"bench {label} job {i}", "size": args.size, "seed": i} for i in range(args.jobs)]

    procs: list[local.Service] = []
    workers: list[local.Service] = []
    sampler = profiler = None
    try:
        for i in range(workers_n):
            service = local.celery_worker(
                outdir,
                {**env, "DATABASE_URL": stack.pg_url(db, ROLES["worker"])},
                name=f"{label}-worker{i}",
                concurrency=args.concurrency,
                pool=args.pool,
                extra_args=list(args.worker_arg),
            )
            service.cwd = str(outdir)  # no stray .env from the caller's directory
            procs.append(service)
            workers.append(service.start())
        beat = local.celery_beat(outdir, {**env, "DATABASE_URL": stack.pg_url(db, ROLES["beat"])})
        beat.name = f"{label}-beat"
        beat.log_path = outdir / f"{label}-beat.log"
        beat.cwd = str(outdir)
        procs.append(beat)
        beat.start()
        api = start_webhook_api(api_port, {**env, "DATABASE_URL": stack.pg_url(db, ROLES["worker"])}, outdir, label)
        if api is not None:
            procs.append(api)
        for service in workers:
            _wait_for_log(service, " ready.")
        time.sleep(1.0)
        publisher = CeleryPublisher(make_app(settings))
        dbstats = DbStats(stack, db)
        dbstats.reset()
        calls0 = sandbox_counters(stack)
        groups = component_groups(stack, workers, beat)
        if api is not None:
            groups.insert(2, ProcGroup("api (webhooks)", [api.process.pid]))
        sampler = Sampler(
            args.sample_interval,
            groups,
            "SELECT state, count(*) FROM jobs GROUP BY state",
            stack.pg_url(db, ROLES["monitor"], driver=False),
        )
        sampler.prime()
        sampler.start()
        if args.profile:
            profiler = Profiler(workers[0].process.pid, outdir / "profile", args.profile_delay, args.profile_seconds, args.profile_rate)
            spy = ProcGroup("py-spy", [])
            spy.processes = lambda: [psutil.Process(p.pid) for p in profiler.procs if p.poll() is None]
            groups.append(spy)
            profiler.start()

        log(
            f"{label}: enqueueing {args.jobs} jobs through {PRODUCER_CALL[args.producer]} ({workers_n} worker(s) x concurrency {args.concurrency})"
        )
        if args.outage_seconds > 0:
            # A provider outage in the middle of the run (503 HTML on every call), then recovery:
            # the provider calls per job then include everything the outage and the recovery cost.
            for delay, down in ((args.outage_at, True), (args.outage_at + args.outage_seconds, False)):
                timer = threading.Timer(
                    delay,
                    lambda down=down: (
                        httpx.put(f"{stack.sandbox_url}/_sandbox/config", json={"outage": down}, timeout=30),
                        log(f"{label}: provider outage {'begins' if down else 'ends'}"),
                    ),
                )
                timer.daemon = True
                timer.start()
        t_start = time.time()
        produce(args, items, settings, publisher)
        t_enqueued = time.time()
        log(f"{label}: enqueued in {t_enqueued - t_start:.1f}s")
        timeout = args.timeout or max(120.0, 4 * args.latency + args.jobs / 5)
        deadline = time.monotonic() + timeout
        next_report = time.monotonic() + 5
        timed_out = False
        while True:
            counts = sampler.snapshot()
            done = sum(counts.get(s, 0) for s in TERMINAL)
            if done >= args.jobs:
                break
            if time.monotonic() > deadline:
                timed_out = True
                log(f"{label}: not drained after {timeout:.0f}s: {counts}")
                break
            for w in workers:
                if not w.running:
                    raise RuntimeError(f"{w.name} died:\n{w.log_tail(3000)}")
            if time.monotonic() >= next_report:
                log(f"{label}: {time.time() - t_start:6.1f}s  " + " ".join(f"{s}={counts[s]}" for s in STATES if counts.get(s)))
                next_report += 5
            time.sleep(0.2)
        t_seen = time.time()
        system = sampler.finish()
        calls1 = sandbox_counters(stack)
        db_report = dbstats.collect()
        if profiler is not None:
            profiler.join(timeout=args.profile_delay + args.profile_seconds + 90)
    finally:
        if profiler is not None:
            profiler.stop()
        if sampler is not None and sampler.is_alive():
            sampler.finish()
        for service in reversed(procs):
            service.stop()

    global _DB_TZ
    created_at_provider = provider_created(stack)
    with get_engine(stack.pg_url(db, ROLES["monitor"])).connect() as conn:
        from zoneinfo import ZoneInfo

        _DB_TZ = ZoneInfo(conn.execute(text("SHOW TimeZone")).scalar())
        rows = conn.execute(text("SELECT state, prompt, created_at, finished_at FROM jobs")).fetchall()
        try:
            events = conn.execute(
                text("SELECT job_id, from_state, to_state, at FROM job_events WHERE to_state = 'processing' OR from_state = 'processing'")
            ).fetchall()
        except Exception:
            events = []
    get_engine(stack.pg_url(db, ROLES["monitor"])).dispose()
    get_engine(settings.database_url).dispose()

    states = Counter(r.state for r in rows)
    ended = [r for r in rows if r.finished_at is not None and r.state in TERMINAL]
    finished = [(epoch(r.created_at), epoch(r.finished_at)) for r in ended]
    succeeded = [(epoch(r.created_at), epoch(r.finished_at)) for r in ended if r.state == "succeeded"]
    first_insert = min((epoch(r.created_at) for r in rows), default=t_start)
    last_terminal = max((f for _, f in finished), default=t_seen)
    drain = (last_terminal - first_insert) if not timed_out else (t_seen - first_insert)
    overheads = [f - c - args.latency for c, f in succeeded]
    # Lag behind the provider: our finished_at minus the moment the provider had the result.
    lags = [
        epoch(r.finished_at) - (created_at_provider[r.prompt] + args.latency)
        for r in ended
        if r.state == "succeeded" and r.prompt in created_at_provider
    ]
    opened: dict[str, float] = {}
    intervals = []
    left_processing: dict[str, float] = {}
    for job_id, src, dst, at in sorted(events, key=lambda e: e[3]):
        if dst == "processing":
            opened[job_id] = epoch(at)
        elif src == "processing" and job_id in opened:
            intervals.append((opened.pop(job_id), epoch(at)))
        if src == "processing":
            left_processing[job_id] = epoch(at)
    # The lag in two parts: how long after the provider finished the poller saw it (processing ->
    # uploading), and how long copying the outputs to S3 and recording took after that.
    with get_engine(stack.pg_url(db, ROLES["monitor"])).connect() as conn:
        ids = {r.prompt: r.id for r in conn.execute(text("SELECT id, prompt FROM jobs WHERE state = 'succeeded'"))}
    get_engine(stack.pg_url(db, ROLES["monitor"])).dispose()
    noticed, copied = [], []
    for r in ended:
        job_id = ids.get(r.prompt)
        if r.state == "succeeded" and job_id in left_processing and r.prompt in created_at_provider:
            noticed.append(left_processing[job_id] - (created_at_provider[r.prompt] + args.latency))
            copied.append(epoch(r.finished_at) - left_processing[job_id])
    intervals += [(start, last_terminal) for start in opened.values()]
    calls = {k: calls1[k] - calls0.get(k, 0) for k in calls1}
    provider_calls = calls["submit_requests"] + calls["result_requests"] + calls["downloads"]
    cpu = {g.name: g.cpu_seconds() for g in groups}
    worker_group = groups[0]
    rss_series = worker_group.rss_series
    terminal = sum(states.get(s, 0) for s in TERMINAL)
    db_total = sum(n for role, n in db_report["by_role"].items() if role != ROLES["monitor"])
    result = {
        "kind": "edit-worker",
        "label": label,
        "workers": workers_n,
        "concurrency": args.concurrency,
        "pool": args.pool,
        "latency": args.latency,
        "jobs": args.jobs,
        "states": dict(states),
        "terminal": terminal,
        "timed_out": timed_out,
        "enqueue_seconds": t_enqueued - t_start,
        "drain_seconds": drain,
        "jobs_per_s": terminal / drain if drain > 0 else None,
        "steady_jobs_per_s": steady_rate([f for _, f in finished]),
        "overhead": {q: percentile(overheads, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))},
        "lag": {q: percentile(lags, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))},
        "lag_noticed": {q: percentile(noticed, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("max", 1.0))},
        "lag_copy": {q: percentile(copied, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("max", 1.0))},
        "max_in_flight_sampled": sampler.max_processing,
        "max_in_flight_exact": max_overlap(intervals) if intervals else None,
        "provider": {
            **calls,
            "per_job": provider_calls / max(terminal, 1),
            "api_per_job": (calls["submit_requests"] + calls["result_requests"]) / max(terminal, 1),
            "downloads_per_job": calls["downloads"] / max(terminal, 1),
            "target_per_job": 2 + math.ceil(args.latency / 2),
        },
        "cpu_seconds": cpu,
        "system": system,
        "cpu_s_per_job": cpu["workers"] / max(terminal, 1),
        "rss_mb": {
            "peak_process": worker_group.peak_proc_rss / 2**20,
            "peak_tree_per_worker": worker_group.peak_tree_rss / 2**20 / workers_n,
            "first_tree": rss_series[0][1] / 2**20 if rss_series else None,
            "last_tree": rss_series[-1][1] / 2**20 if rss_series else None,
        },
        "db": {**db_report, "per_job": db_total / max(terminal, 1)},
        "profiled": bool(args.profile),
        "webhooks": bool(getattr(args, "webhooks", False)),
        "busiest": busiest_processes(groups),
        # Every succeeded job's lag (s, rounded), for bench/plot.py's distribution.
        "lags": sorted(round(x, 3) for x in lags),
        "sampler_errors": sampler.errors,
        # Time series (seconds from enqueue): worker RSS (tree total, largest process) and rows by state.
        "rss_series_mb": [(round(t - t_start, 1), round(total / 2**20, 1), round(largest / 2**20, 1)) for t, total, largest in rss_series],
        "state_series": [(round(t - t_start, 1), counts) for t, counts in sampler.count_series],
    }
    if profiler is not None:
        if profiler.error:
            log(f"profile: {profiler.error}")
            result["profile_error"] = profiler.error
        else:
            result["profile"] = analyse_profile(outdir / "profile")
    return result


# --- the baseline phase ------------------------------------------------------------------------


# --- the producer side (bench/admission.py holds the measurements) ---------------------------

PRODUCER_CALL = {"many": "submit_edit_many", "one": "one submit_edit at a time", "http": "POST /jobs/batch"}


def produce(args, items: list[dict], settings, publisher) -> dict:
    """Put the run's jobs in the way --producer says (many: submit_edit_many batches; one: one
    submit_edit call at a time at --rate jobs/s); the admission figures."""
    import admission

    if args.producer == "one":
        return admission.admit_one(items, settings, publisher, args.rate)
    return admission.admit_many(items, settings, publisher, args.batch_size)


def run_admission_only(stack: Stack, args, outdir: Path) -> dict:
    """--admission-only: admission without workers, on a fresh database (bench/admission.py)."""
    import admission

    env = admission.base_env(stack)
    result = admission.run(stack, env, args, outdir, f"admission-{args.producer}")
    result.pop("database_url", None)
    return result


def run_baseline(stack: Stack, args, workers_n: int, label: str, outdir: Path) -> dict:
    import base64

    import psycopg

    from bench import baseline

    db = f"bench_{label}".replace("-", "_")
    bucket = f"bench-{label}-{uuid.uuid4().hex[:6]}".replace("_", "-").lower()
    local.create_database(stack.pg_url(), db)
    with psycopg.connect(stack.pg_url(db, driver=False), autocommit=True) as conn:
        conn.execute(baseline.SCHEMA)
    reset_world(stack, args.latency)
    make_bucket(stack, bucket)
    env = {
        **base_env(stack, args, bucket),
        "BASELINE_DATABASE_URL": stack.pg_url(db, ROLES["baseline"], driver=False),
        "BASELINE_POLL_INTERVAL": f"{args.baseline_poll:g}",
        "S3_PREFIX": "baseline",
    }
    n_jobs = args.baseline_jobs or args.jobs
    image_path = outdir / "input.png"
    if not image_path.exists():
        from PIL import Image

        Image.new("RGB", (64, 64), (10, 120, 200)).save(image_path)
    image = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()

    procs: list[local.Service] = []
    sampler = None
    try:
        for i in range(workers_n):
            argv = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.baseline",
                "worker",
                "-Q",
                baseline.QUEUE,
                "--concurrency",
                str(args.concurrency),
                "--pool",
                args.pool,
                "--hostname",
                f"{label}{i}@%h",
                "--loglevel",
                "INFO",
            ]
            service = local.Service(
                f"{label}-worker{i}", argv, 0, outdir / f"{label}-worker{i}.log", env=env, cwd=str(ROOT), wait_port=False
            )
            procs.append(service)
            service.start()
        for service in procs:
            _wait_for_log(service, " ready.")
        time.sleep(1.0)
        dbstats = DbStats(stack, db)
        dbstats.reset()
        groups = component_groups(stack, procs, None)
        sampler = Sampler(
            args.sample_interval,
            groups,
            "SELECT state, count(*) FROM baseline_results GROUP BY state",
            stack.pg_url(db, ROLES["monitor"], driver=False),
        )
        sampler.prime()
        sampler.start()
        baseline.app.conf.broker_url = stack.broker_url
        log(f"{label}: enqueueing {n_jobs} baseline jobs, time box {args.baseline_seconds:g}s")
        t_start = baseline.enqueue(n_jobs, image=image, size=args.size, label=label)
        box_end = t_start + args.baseline_seconds
        next_report = time.time() + 10
        while time.time() < box_end:
            done = sum(sampler.snapshot().values())
            if done >= n_jobs:
                break
            if time.time() >= next_report:
                log(f"{label}: {time.time() - t_start:6.1f}s  completed={done}")
                next_report += 10
            time.sleep(0.2)
        t_end = time.time()
        system = sampler.finish()
        db_report = dbstats.collect()
        created_at_provider = provider_created(stack)
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.finish()
        for service in reversed(procs):
            service.kill()  # time box over: in-flight baseline tasks are abandoned, not awaited

    with psycopg.connect(stack.pg_url(db, ROLES["monitor"], driver=False), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state, created_at, started_at, finished_at, provider_calls, outputs, prompt FROM baseline_results"
        ).fetchall()
    rows = [r for r in rows if r[3] <= t_end]
    lags = [r[3] - (created_at_provider[r[6]] + args.latency) for r in rows if r[0] == "succeeded" and r[6] in created_at_provider]
    completed = len(rows)
    all_done = completed >= n_jobs
    elapsed = (max(r[3] for r in rows) - t_start) if all_done else (t_end - t_start)
    cpu = {g.name: g.cpu_seconds() for g in groups}
    worker_group = groups[0]
    db_total = sum(n for role, n in db_report["by_role"].items() if role != ROLES["monitor"])
    return {
        "kind": "baseline",
        "label": label,
        "workers": workers_n,
        "concurrency": args.concurrency,
        "pool": args.pool,
        "latency": args.latency,
        "jobs": n_jobs,
        "states": dict(Counter(r[0] for r in rows)),
        "terminal": completed,
        "timed_out": not all_done,
        "time_box": args.baseline_seconds,
        "drain_seconds": elapsed,
        "jobs_per_s": completed / elapsed if elapsed > 0 else None,
        "steady_jobs_per_s": steady_rate([r[3] for r in rows]),
        "est_drain_all_seconds": (n_jobs / (completed / elapsed)) if completed else None,
        "overhead": {
            q: percentile([r[3] - r[1] - args.latency for r in rows], v)
            for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
        },
        "lag": {q: percentile(lags, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))},
        "overhead_in_slot": {
            q: percentile([r[3] - r[2] - args.latency for r in rows], v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
        "max_in_flight_sampled": None,
        "max_in_flight_exact": max_overlap([(r[2], r[3]) for r in rows]) if rows else 0,
        "provider": {
            "per_job": sum(r[4] for r in rows) / max(completed, 1),
            "api_per_job": sum(r[4] - r[5] for r in rows) / max(completed, 1),
            "downloads_per_job": sum(r[5] for r in rows) / max(completed, 1),
            "target_per_job": 2 + math.ceil(args.latency / 2),
        },
        "cpu_seconds": cpu,
        "system": system,
        "cpu_s_per_job": cpu["workers"] / max(completed, 1),
        "rss_mb": {
            "peak_process": worker_group.peak_proc_rss / 2**20,
            "peak_tree_per_worker": worker_group.peak_tree_rss / 2**20 / workers_n,
        },
        "db": {**db_report, "per_job": db_total / max(completed, 1)},
        "profiled": False,
    }


# --- reporting ---------------------------------------------------------------------------------

COLUMNS = [
    "run",
    "W x C",
    "jobs done",
    "drain s",
    "jobs/s",
    "steady jobs/s",
    "overhead p50/p95/p99 s",
    "lag behind provider p50/p95/p99 s",
    "max in flight",
    "provider API calls/job + downloads",
    "worker CPU-s/job",
    "peak RSS/worker proc MB",
    "DB stmts/job",
]


def _f(value, fmt: str = "{:.1f}", none: str = "–") -> str:
    return none if value is None else fmt.format(value)


def row_for(r: dict) -> list[str]:
    o = r["overhead"]
    if r["kind"] == "baseline":
        name = "blocking baseline"
        drain = f"time-boxed {r['time_box']:g}" if r["timed_out"] else _f(r["drain_seconds"])
        if r["timed_out"] and r.get("est_drain_all_seconds"):
            drain += f" (all {r['jobs']}: ~{r['est_drain_all_seconds']:.0f})"
    else:
        name = "edit-worker" + (" (webhooks)" if r.get("webhooks") else "") + (" (profiled)" if r.get("profiled") else "")
        drain = _f(r["drain_seconds"]) + (" TIMEOUT" if r["timed_out"] else "")
    in_flight = r["max_in_flight_sampled"]
    exact = r["max_in_flight_exact"]
    flight = (
        f"{in_flight} (exact {exact})"
        if in_flight is not None and exact is not None
        else _f(exact if in_flight is None else in_flight, "{}")
    )
    db_label = "" if r["db"]["kind"] == "statements" else " xacts"
    return [
        name,
        f"{r['workers']}x{r['concurrency']}",
        f"{r['terminal']}/{r['jobs']}",
        drain,
        _f(r["jobs_per_s"], "{:.2f}"),
        _f(r["steady_jobs_per_s"], "{:.2f}"),
        f"{_f(o['p50'], '{:.2f}')}/{_f(o['p95'], '{:.2f}')}/{_f(o['p99'], '{:.2f}')}",
        "/".join(_f(r["lag"][q], "{:.2f}") for q in ("p50", "p95", "p99")),
        flight,
        f"{_f(r['provider']['api_per_job'], '{:.2f}')} + {_f(r['provider']['downloads_per_job'], '{:.2f}')} dl",
        _f(r["cpu_s_per_job"], "{:.4f}"),
        _f(r["rss_mb"]["peak_process"], "{:.0f}"),
        _f(r["db"]["per_job"], "{:.1f}") + db_label,
    ]


def details_for(r: dict) -> list[str]:
    lines = []
    cpu = r["cpu_seconds"]
    sysinfo = r["system"]
    other = sysinfo["system_busy"] - sum(cpu.values())
    lines.append(
        f"{r['label']}: CPU-s "
        + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
        + f", other processes on the machine (not this benchmark) {other:.1f}; machine busy {sysinfo['system_busy']:.1f} CPU-s "
        f"over {sysinfo['wall']:.1f}s = {sysinfo['util_pct']:.0f}% of {sysinfo['cpus']} cores"
    )
    if r["kind"] == "edit-worker":
        p = r["provider"]
        lines.append(
            f"{r['label']}: enqueue {r['enqueue_seconds']:.1f}s; states {r['states']}; provider submit {p['submit_requests']} "
            f"result {p['result_requests']} download {p['downloads']}: API calls {p['api_per_job']:.2f}/job (target <= {p['target_per_job']}), "
            f"all incl. downloads {p['per_job']:.2f}/job; "
            f"overhead max {_f(r['overhead']['max'], '{:.2f}')}s; worker RSS tree first/last/peak per worker "
            f"{_f(r['rss_mb']['first_tree'], '{:.0f}')}/{_f(r['rss_mb']['last_tree'], '{:.0f}')}/{r['rss_mb']['peak_tree_per_worker']:.0f} MB"
        )
        if r.get("lag_noticed"):
            n, c = r["lag_noticed"], r["lag_copy"]
            lines.append(
                f"{r['label']}: lag behind provider, in two parts p50/p95/max: seen by a poll "
                f"{_f(n['p50'], '{:.2f}')}/{_f(n['p95'], '{:.2f}')}/{_f(n['max'], '{:.2f}')}s after the provider finished, "
                f"then copied to S3 and recorded in {_f(c['p50'], '{:.2f}')}/{_f(c['p95'], '{:.2f}')}/{_f(c['max'], '{:.2f}')}s"
            )
    else:
        s = r["overhead_in_slot"]
        lines.append(
            f"{r['label']}: overhead counted from the slot picking the job up (excl. queueing) p50/p95/p99 "
            f"{_f(s['p50'], '{:.2f}')}/{_f(s['p95'], '{:.2f}')}/{_f(s['p99'], '{:.2f}')}s; max in flight = busy slots"
        )
    if r["terminal"] and r["kind"] == "edit-worker":
        # Contamination-proof ceilings: what 100% of this machine's cores would drain at this CPU cost per job.
        stack_cpu = sum(v for k, v in cpu.items() if k not in ("harness", "py-spy"))
        lines.append(
            f"{r['label']}: CPU per job: workers {cpu['workers'] / r['terminal']:.4f} s, whole stack excl. harness "
            f"{stack_cpu / r['terminal']:.4f} s -> CPU ceiling on {sysinfo['cpus']} cores: "
            f"{sysinfo['cpus'] * r['terminal'] / max(stack_cpu, 1e-9):.0f} jobs/s (workers alone: "
            f"{sysinfo['cpus'] * r['terminal'] / max(cpu['workers'], 1e-9):.0f} jobs/s)"
        )
    if "busiest" in r:
        lines.append(busiest_line(r))
    db = r["db"]
    lines.append(f"{r['label']}: DB {db['kind']} by role " + ", ".join(f"{k} {v}" for k, v in sorted(db["by_role"].items())))
    for top in db.get("top", [])[:8]:
        lines.append(f"    {top['calls']:7d} x {top['role']:<11} {top['query'][:110]}")
    return lines


def print_report(results: list[dict], args, command: str, outdir: Path) -> str:
    rows = [row_for(r) for r in results]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"scale benchmark: latency {args.latency:g}s, size {args.size}", show_lines=False)
        for col in COLUMNS:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        Console(width=200).print(table)
    except ImportError:
        for row in [COLUMNS, *rows]:
            print(" | ".join(row))
    speedups = []
    for r in results:
        if r["kind"] != "edit-worker":
            continue
        base = next((b for b in results if b["kind"] == "baseline" and b["workers"] == r["workers"]), None)
        if base and base["jobs_per_s"] and r["jobs_per_s"]:
            speedups.append(
                f"speedup W={r['workers']}: {r['jobs_per_s'] / base['jobs_per_s']:.0f}x the blocking baseline "
                f"({r['jobs_per_s']:.2f} vs {base['jobs_per_s']:.3f} jobs/s)"
            )
    for line in speedups:
        print(line)
    details = [line for r in results for line in details_for(r)]
    print("\n".join(details))

    md = [
        f"Command: `{command}`  ",
        f"Date: {datetime.now().strftime('%Y-%m-%d %H:%M')}, machine: {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GB RAM, S3 server: {args.s3}, pool: {args.pool}, run dir: `{outdir.relative_to(ROOT) if outdir.is_relative_to(ROOT) else outdir}`  ",
        f"Code measured: {CODE_VERSION}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md.append("")
    md += [f"- {line}" for line in speedups]
    md += ["", "```", *details, "```"]
    text = "\n".join(md)
    print("\n--- markdown ---\n" + text)
    return text


def code_version() -> str:
    """Which product code was measured: HEAD plus a digest of the working tree's worker/ and models/
    (others edit them while benchmarks run)."""
    import hashlib

    digest = hashlib.sha1()
    for path in sorted([*ROOT.glob("worker/*.py"), *ROOT.glob("models/*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker", "models"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "?", ""
    return f"{head}{' + uncommitted changes' if dirty else ''} (worker/+models/ sha1 {digest.hexdigest()[:10]})"


def wait_for_quiet_machine(limit: float, threshold: float) -> None:
    """On a shared host other people's tests skew every number: wait (bounded) for a quiet moment."""
    deadline = time.monotonic() + limit
    while True:
        busy = psutil.cpu_percent(interval=3.0)
        if busy <= threshold:
            log(f"machine quiet ({busy:.0f}% CPU)")
            return
        if time.monotonic() > deadline:
            log(f"machine still {busy:.0f}% busy after {limit:.0f}s; running anyway (see 'other processes' in the details)")
            return
        log(f"machine {busy:.0f}% busy with other processes; waiting")


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200, help="jobs per edit-worker run (default 200)")
    p.add_argument("--latency", type=float, default=10.0, help="sandbox inference latency in seconds (0 = max throughput mode)")
    p.add_argument("--workers", default="1", help="worker processes; a comma list runs one edit-worker phase each, e.g. 1,2,4")
    p.add_argument("--concurrency", type=int, default=2, help="Celery --concurrency per worker process (default 2)")
    p.add_argument("--pool", default="prefork", help="Celery pool for both workers (default prefork)")
    p.add_argument("--size", default="512*512", help="requested output size (default 512*512)")
    p.add_argument("--batch-size", type=int, default=500, help="submit_edit_many batch size")
    p.add_argument("--baseline-seconds", type=float, default=120.0, help="time box of the blocking baseline per worker count (0 skips it)")
    p.add_argument("--baseline-jobs", type=int, default=0, help="jobs queued for the baseline (default: --jobs)")
    p.add_argument("--baseline-poll", type=float, default=2.0, help="the baseline's sleep between result polls (default 2 s)")
    p.add_argument("--baseline-first", action="store_true", help="run the baseline before the edit worker")
    p.add_argument(
        "--timeout", type=float, default=0.0, help="drain time limit per edit-worker run (default: max(120, 4*latency + jobs/5))"
    )
    # rclone (Go) costs this 2-core machine about a third of moto's (Python) CPU per object, and
    # keeps objects on disk like a real server; moto when rclone is not installed.
    p.add_argument(
        "--s3",
        choices=("moto", "rclone"),
        default="rclone" if shutil.which("rclone") else "moto",
        help="S3 server (default: rclone over a temp dir if installed (test extra), else moto in memory)",
    )
    p.add_argument("--outage-at", type=float, default=5.0, help="seconds after enqueue starts when --outage-seconds begins")
    p.add_argument("--outage-seconds", type=float, default=0.0, help="inject a provider outage (503 everywhere) of this length")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for worker and beat (repeatable)")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG", help="extra `edit-worker worker` argument (repeatable)")
    p.add_argument("--sample-interval", type=float, default=0.5)
    p.add_argument("--profile", action="store_true", help="py-spy worker 0 during the edit-worker run")
    p.add_argument("--profile-delay", type=float, default=2.0, help="seconds after enqueue starts before profiling")
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to leave the machine quiet (shared hosts)",
    )
    p.add_argument("--idle-threshold", type=float, default=15.0, help="machine CPU %% counted as quiet (default 15)")
    p.add_argument("--webhooks", action="store_true", help="run `edit-worker api` and have the sandbox call each job's signed webhook URL")
    p.add_argument("--json-out", default="", metavar="PATH", help="also write the run's figures as JSON to PATH (bench/plot.py reads them)")
    p.add_argument("--label", default="", help="name for the run directory")
    p.add_argument("--keep", action="store_true", help="keep service logs even when the run succeeds (always kept on failure)")
    admission.add_arguments(p)
    p.add_argument(
        "--admission-only", action="store_true", help="measure admission alone (no workers, no baseline): --producer, --rate, --jobs"
    )
    args = p.parse_args(argv)
    if args.producer == "http" and not args.admission_only:
        p.error("--producer http runs with --admission-only (the API is started for it)")
    args.workers_list = [int(x) for x in str(args.workers).split(",") if x.strip()]
    if not args.workers_list or min(args.workers_list) < 1 or args.jobs < 1 or args.concurrency < 1:
        p.error("--workers, --jobs and --concurrency must be positive")
    return args


CODE_VERSION = "?"


def main(argv: list[str] | None = None) -> int:
    global CODE_VERSION
    args = parse_args(argv)
    CODE_VERSION = code_version()
    command = "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = args.label or f"n{args.jobs}-l{args.latency:g}-w{args.workers.replace(',', '_')}-c{args.concurrency}"
    outdir = RUNS_DIR / f"{stamp}-{slug}"
    outdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(outdir / "stack")

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    results: list[dict] = []
    ok = False
    try:
        if args.wait_idle > 0:
            wait_for_quiet_machine(args.wait_idle, args.idle_threshold)
        log(f"starting the stack (run dir {outdir})")
        stack.start(args)
        log(
            f"stack up: redis :{stack.redis.port}, s3 ({args.s3}) :{stack.s3.port}, sandbox :{stack.sandbox.port} "
            f"(latency {args.latency:g}s), postgres :{stack.pg_port} (pg_stat_statements: {stack.pg_stat_statements})"
        )
        if args.admission_only:
            result = run_admission_only(stack, args, outdir)
            print(json.dumps(result, indent=2))
            (outdir / "result.json").write_text(json.dumps({"command": command, "code": CODE_VERSION, "result": result}, indent=2))
            return 0
        for w in args.workers_list:
            phases = [("baseline", run_baseline), ("ew", run_edit_worker)]
            if not args.baseline_first:
                phases.reverse()
            for kind, fn in phases:
                if kind == "baseline" and args.baseline_seconds <= 0:
                    continue
                results.append(fn(stack, args, w, f"{kind}-w{w}", outdir))
                (outdir / "result.json").write_text(
                    json.dumps({"command": command, "code": CODE_VERSION, "args": vars(args), "results": results}, indent=2, default=str)
                )
        ok = True
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); tearing down")
    except Exception:
        traceback.print_exc()
        log(f"run failed; logs kept in {outdir}")
    finally:
        stack.stop()
    if results:
        text = print_report(results, args, command, outdir)
        (outdir / "summary.md").write_text(text + "\n")
        if args.json_out:
            write_json_out(args.json_out, command, args, results)
        for r in results:
            if "profile" in r:
                (outdir / "profile" / "summary.txt").write_text(print_profile(r["profile"], outdir / "profile") + "\n")
        log(f"results in {outdir}")
    if ok and not args.keep:
        shutil.rmtree(outdir / "stack", ignore_errors=True)
    return 0 if ok and all(not r["timed_out"] or r["kind"] == "baseline" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
