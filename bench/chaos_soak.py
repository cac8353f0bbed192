#!/usr/bin/env python
"""Chaos soak: the whole stack on 127.0.0.1, N jobs in waves, a seeded random mix of faults while
they run, then the checks the integration tests make — at volume.

    python bench/chaos_soak.py --jobs 500 --seed 1 [--duration-limit 900]

Starts (each a real child process, own process group, torn down in `finally`, also on Ctrl-C):
redis-server, PostgreSQL (throwaway cluster under /tmp), a persistent S3 server (rclone: objects
survive a restart), the sandbox provider (~1 s latency), 2 Celery workers (prefork, concurrency 4)
and beat, with fast reconciler timings.

Faults, in two bounded, self-reverting lanes that stop at the end of the chaos window:
  infra lane    : SIGKILL a worker's process group + restart; SIGKILL one pool child only;
                  SIGKILL Redis + restart it empty; stop/start PostgreSQL; stop/start the S3 server
  provider lane : outage (503 HTML everywhere) 10-30 s; bursts of submit 429 / 500 / 502-HTML;
                  result-poll 500s; slow submits (answer after the client's timeout: ambiguous);
                  output-download 503s; a hostile provider (the sandbox's hostile mode: HTML 4xx
                  pages, garbage / truncated JSON, foreign ids, endless and slow bodies, non-image
                  outputs, redirects to a local "internal" server that must never be fetched)

Checks: every job terminal; every succeeded job's S3 objects byte-equal to the sandbox's
/outputs/{prediction_id}/{i}.png and its prediction created for the job's own prompt; provider
submissions per prompt (duplicates = prompts submitted more than once). Prints one summary line

  chaos: jobs=… succeeded=… failed=…{reason:count} paid_submissions=… duplicates=… lost=…
         needs_operator=… bytes_checked=… faults=…{kind:count} unexpected_exits=…{process:count} elapsed=…s
         ambiguous=… answered_ambiguous=… beyond_p95=…s beyond_max=…s internal_hits=…

(on one line), then `chaos-latency: {kind:windows/jobs/ambiguous/p95/max,…}`, and exits non-zero if
lost > 0 or duplicates > 0 (also on wrong outputs, on a job sent down the ambiguous-submit path by an
answered HTTP error, or on any fetch of the internal server). Latency, per fault kind: `ambiguous`
counts jobs that took the ambiguous-submit path while a window of that kind was open (flagged when
only faults that answer with HTTP errors were open); "beyond" is how long a job took after the last
fault window its life overlapped had ended (p95/max), attributed to that window's kind ("none": no
fault touched the job). The table is on stderr. Jobs the
product parks for an operator (state `submitting`, error `ambiguous_submit_needs_operator`) are
counted in needs_operator=, not in lost=. unexpected_exits counts worker/beat processes that died
by themselves (no fault killed them); by default they are restarted like docker-compose.yml's
`restart: unless-stopped` does, `--no-supervise` leaves them dead. elapsed is from the first
submission until every job settled (or the limits hit).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import random
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from worker.config import settings_from_env  # noqa: E402
from worker.devtools import local  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")
NEEDS_OPERATOR = "ambiguous_submit_needs_operator"
CLEAN_SANDBOX = {
    "latency": 1.0,
    "fail_rate": 0.0,
    "submit_error_rate": 0.0,
    "submit_error_status": 500,
    "result_error_rate": 0.0,
    "slow_submit_rate": 0.0,
    "slow_submit_seconds": 8.0,
    "download_fail_rate": 0.0,
    "outage": False,
    "auth_failure": False,
    "hostile_rate": 0.0,
}
WEBHOOK_SECRET = "whsec_test-chaos-soak-not-a-secret"
WORDS = (
    "sky",
    "sunset",
    "neon",
    "snow",
    "sketch",
    "watercolor",
    "forest",
    "ocean",
    "glow",
    "fog",
    "castle",
    "desert",
    "storm",
    "retro",
    "pastel",
    "golden",
    "marble",
    "paper",
    "glass",
    "ember",
)


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack(local.StackURLs):
    workdir: Path
    pgdir: Path
    seed: int
    webhooks: bool = False
    redis: local.Service | None = None
    api: local.Service | None = None
    s3: local.Service | None = None
    sandbox: local.Service | None = None
    postgres: local.Service | None = None
    workers: list[local.Service] = field(default_factory=list)
    beat: local.Service | None = None
    env: dict[str, str] = field(default_factory=dict)
    settings: object = None
    # Held while a service is (re)started or stopped, so teardown never races a fault's restart.
    lock: threading.Lock = field(default_factory=threading.Lock)
    torn_down: bool = False
    # Processes a fault took down on purpose (the supervisor leaves those to the fault's restart).
    held_down: set[str] = field(default_factory=set)
    # Worker/beat processes that exited by themselves (not by a fault): name -> count.
    exits: collections.Counter = field(default_factory=collections.Counter)
    # A stand-in internal service the hostile provider's redirects point at: it must get no hit.
    internal: InternalServer | None = None

    @property
    def internal_url(self) -> str:
        return self.internal.url if self.internal else "http://169.254.169.254/latest/meta-data/"

    def services(self) -> list[local.Service]:
        procs = [self.beat, *self.workers, self.api, self.sandbox, self.s3, self.redis, self.postgres]
        return [p for p in procs if p is not None]

    def start(self) -> None:
        self.internal = InternalServer().start()
        self.redis = local.redis(self.workdir / "redis").start()
        self.s3 = local.s3_persistent(self.workdir).start()
        self.sandbox = local.sandbox(self.workdir, latency=1.0, outputs="flat", extra_args=["--seed", str(self.seed)]).start()
        self.postgres = local.postgres(self.pgdir).start()
        admin = self.postgres.extra["url"]
        local.wait_for_database(admin)
        db_url = local.create_database(admin, "chaos")
        bucket = "chaos-soak"
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("EDIT_WORKER_", "WAVESPEED_", "S3_", "AWS_", "CELERY_", "DATABASE_URL"))
            },
            "DATABASE_URL": db_url,
            "CELERY_BROKER_URL": self.broker_url,
            "S3_ENDPOINT_URL": self.s3_url,
            "S3_BUCKET": bucket,
            "S3_PREFIX": "edits",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "WAVESPEED_API_KEY": "sandbox-key",
            "WAVESPEED_BASE_URL": self.sandbox_url,
            "EDIT_WORKER_FIRST_POLL_DELAY": "1",
            "EDIT_WORKER_SWEEP_INTERVAL": "1",
            "EDIT_WORKER_STUCK_AFTER_SECONDS": "6",
            "EDIT_WORKER_HTTP_TIMEOUT": "5",
            "EDIT_WORKER_BACKOFF_BASE": "0.5",
            "EDIT_WORKER_BACKOFF_MAX": "4",
            "EDIT_WORKER_AMBIGUOUS_SKEW_SECONDS": "2",
            "EDIT_WORKER_AMBIGUOUS_LIST_GRACE_SECONDS": "2",
            "EDIT_WORKER_RATE_LIMIT_PER_MINUTE": "1000000",
            "PYTHONUNBUFFERED": "1",
        }
        if self.webhooks:
            # The provider calls each job's own signed webhook URL on `edit-worker api`.
            api_port = local.free_port()
            self.env["WAVESPEED_WEBHOOK_SECRET"] = WEBHOOK_SECRET
            self.env["EDIT_WORKER_WEBHOOK_URL"] = f"http://127.0.0.1:{api_port}/webhooks/wavespeed"
        self.settings = settings_from_env(self.env)
        from worker.adapters.database import migrate
        from worker.adapters.storage import Storage

        migrate(db_url)
        Storage.from_settings(self.settings).ensure_bucket()
        self.sandbox_config(**CLEAN_SANDBOX)
        if self.webhooks:
            self.sandbox_config(webhook_secret=WEBHOOK_SECRET)
            self.api = local.Service(
                "api",
                [sys.executable, "-m", "worker.cli", "api", "--port", str(api_port)],
                api_port,
                self.workdir / "api.log",
                env=self.env,
                cwd=str(ROOT),
            ).start()
        for i in range(2):
            worker = local.celery_worker(self.workdir, self.env, name=f"w{i + 1}", concurrency=4)
            worker.cwd = str(ROOT)
            self.workers.append(worker.start())
        self.beat = local.celery_beat(self.workdir, self.env)
        self.beat.cwd = str(ROOT)
        self.beat.start()

    def sandbox_config(self, **changes) -> None:
        for attempt in range(5):
            try:
                httpx.put(f"{self.sandbox_url}/_sandbox/config", json=changes, timeout=10).raise_for_status()
                return
            except httpx.HTTPError:
                if attempt == 4:
                    raise
                time.sleep(0.5)

    def sandbox_stats(self) -> dict:
        return httpx.get(f"{self.sandbox_url}/_sandbox/stats", timeout=30).json()

    def teardown(self) -> None:
        with self.lock:
            self.torn_down = True
            for service in self.services():
                try:
                    service.stop(timeout=10)
                except Exception as exc:  # keep going: every process must go
                    log(f"teardown: stopping {service.name} failed: {exc!r}")
                    try:
                        service.kill()
                    except Exception:
                        pass
            if self.internal is not None:
                self.internal.stop()


class InternalServer:
    """An HTTP server on 127.0.0.1 playing an internal service (cloud metadata, an admin port);
    counts every request it gets."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                hits.append(f"{self.command} {self.path}")
                body = b'{"AccessKeyId": "internal-secret"}'
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_HEAD = do_PUT = _any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/latest/meta-data/iam/security-credentials/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="internal-server", daemon=True)

    def start(self) -> InternalServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- faults ------------------------------------------------------------------------------------


class Chaos:
    """Two lanes of faults; every fault reverts itself (restart / clean config) before the next."""

    INFRA = ("worker_kill", "worker_child_kill", "redis_restart", "postgres_restart", "s3_restart")
    PROVIDER = (
        "provider_outage",
        "submit_429",
        "submit_500",
        "submit_502_html",
        "result_errors",
        "slow_submits",
        "download_failures",
        "hostile_provider",
    )
    # Faults that answer every failed call with an HTTP error: none of them may send a job down
    # the ambiguous-submit path (only a submit without an answer is ambiguous).
    ANSWERED = ("provider_outage", "submit_429", "submit_500", "submit_502_html", "result_errors", "download_failures", "hostile_provider")

    def __init__(self, stack: Stack, seed: int, end: float, t0: float, only: set[str] | None = None):
        self.stack = stack
        self.only = only  # fault kinds to draw from (None: all)
        self.end = end
        self.t0 = t0
        self.stop = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.timeline: list[str] = []
        # Each fault's window on the wall clock: [kind, start, end] (end None while it lasts).
        self.windows: list[list] = []
        self._mutex = threading.Lock()
        self._rngs = {"infra": random.Random(f"{seed}:infra"), "provider": random.Random(f"{seed}:provider")}
        self.threads = [
            threading.Thread(target=self._lane, args=(name,), name=f"chaos-{name}", daemon=True) for name in ("infra", "provider")
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _note(self, kind: str, detail: str) -> list:
        """Record a fault that starts now; returns its window, which `_end` closes when the fault
        is reverted (a window left open is closed at the end of the run)."""
        with self._mutex:
            self.counts[kind] += 1
            line = f"t={time.monotonic() - self.t0:6.1f}s {kind}: {detail}"
            self.timeline.append(line)
            window = [kind, time.time(), None]
            if not kind.endswith("_skipped"):
                self.windows.append(window)
        log("fault " + line)
        return window

    @staticmethod
    def _end(window: list | None) -> None:
        if window is not None and window[2] is None:
            window[2] = time.time()

    def _sleep(self, seconds: float) -> bool:
        """Sleep; False if the run is being aborted."""
        return not self.stop.wait(max(0.0, seconds))

    def _lane(self, lane: str) -> None:
        rng = self._rngs[lane]
        kinds = [k for k in (self.INFRA if lane == "infra" else self.PROVIDER) if self.only is None or k in self.only]
        if not kinds:
            return
        gap = (3.0, 8.0) if lane == "infra" else (2.0, 6.0)
        deck: list[str] = []
        try:
            while not self.stop.is_set():
                if not self._sleep(rng.uniform(*gap)) or time.monotonic() >= self.end:
                    return
                # A shuffled deck: every kind comes once, in a seeded random order, before any repeats.
                if not deck:
                    deck = list(kinds)
                    rng.shuffle(deck)
                kind = deck.pop()
                getattr(self, "_" + kind if lane == "infra" else "_provider")(rng, kind)
        except Exception as exc:
            self.errors.append(f"{lane} lane: {exc!r}")
            log(f"{lane} lane crashed: {traceback.format_exc()}")

    # --- infra ---
    def _restart(self, service: local.Service) -> None:
        for attempt in range(5):
            with self.stack.lock:
                if self.stack.torn_down:
                    return
                try:
                    service.start()
                    return
                except Exception as exc:
                    if service.running:
                        service.kill()
                    if attempt == 4:
                        raise RuntimeError(f"could not restart {service.name}: {exc}") from exc
            time.sleep(1.0)

    def _worker_kill(self, rng: random.Random, kind: str) -> None:
        worker = rng.choice(self.stack.workers)
        down = rng.uniform(1.0, 4.0)
        with self.stack.lock:
            if self.stack.torn_down:
                return
            pid = worker.process.pid if worker.process else None
            self.stack.held_down.add(worker.name)
            worker.kill()
        window = self._note(kind, f"SIGKILL process group of {worker.name} (pid {pid}), restart in {down:.1f}s")
        self._sleep(down)
        try:
            self._restart(worker)
        finally:
            self.stack.held_down.discard(worker.name)
            self._end(window)

    def _worker_child_kill(self, rng: random.Random, kind: str) -> None:
        worker = rng.choice(self.stack.workers)
        with self.stack.lock:
            if self.stack.torn_down or not worker.running:
                return
            try:
                children = psutil.Process(worker.process.pid).children(recursive=False)
            except psutil.Error:
                children = []
            if not children:
                self._note(kind + "_skipped", f"{worker.name} has no pool children yet")
                return
            victim = rng.choice(children)
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        self._end(self._note(kind, f"SIGKILL pool child {victim.pid} of {worker.name} (pid {worker.process.pid})"))

    def _redis_restart(self, rng: random.Random, kind: str) -> None:
        down = rng.uniform(1.0, 5.0)
        with self.stack.lock:
            if self.stack.torn_down:
                return
            self.stack.redis.kill()
        window = self._note(kind, f"SIGKILL redis-server, restart empty in {down:.1f}s")
        self._sleep(down)
        try:
            self._restart(self.stack.redis)
        finally:
            self._end(window)

    def _postgres_restart(self, rng: random.Random, kind: str) -> None:
        down = rng.uniform(2.0, 8.0)
        service = self.stack.postgres
        with self.stack.lock:
            if self.stack.torn_down:
                return
            # Fast shutdown (SIGINT to the postmaster): sessions are cut, as on a failover.
            service.process.send_signal(signal.SIGINT)
            try:
                service.process.wait(20)
            except subprocess.TimeoutExpired:
                service.kill()
        window = self._note(kind, f"PostgreSQL stopped (fast shutdown), start in {down:.1f}s")
        self._sleep(down)
        try:
            self._restart(service)
        finally:
            self._end(window)

    def _s3_restart(self, rng: random.Random, kind: str) -> None:
        down = rng.uniform(2.0, 8.0)
        with self.stack.lock:
            if self.stack.torn_down:
                return
            self.stack.s3.stop(timeout=10)
        window = self._note(kind, f"S3 server stopped, start in {down:.1f}s")
        self._sleep(down)
        try:
            self._restart(self.stack.s3)
        finally:
            self._end(window)

    # --- provider (the sandbox's runtime fault injection) ---
    def _provider(self, rng: random.Random, kind: str) -> None:
        if kind == "provider_outage":
            hold, change = rng.uniform(10.0, 30.0), {"outage": True}
        else:
            hold = rng.uniform(5.0, 15.0)
            rate = round(rng.uniform(0.3, 0.6), 2)
            change = {
                "submit_429": {"submit_error_rate": rate, "submit_error_status": 429},
                "submit_500": {"submit_error_rate": rate, "submit_error_status": 500},
                "submit_502_html": {"submit_error_rate": rate, "submit_error_status": 502},
                "result_errors": {"result_error_rate": rate},
                "slow_submits": {"slow_submit_rate": round(rng.uniform(0.2, 0.5), 2), "slow_submit_seconds": 8.0},
                "download_failures": {"download_fail_rate": rate},
                # HTML 4xx pages, garbage/truncated JSON, foreign ids, endless and slow bodies,
                # redirects to the soak's internal server: never definitive, never to be fetched.
                "hostile_provider": {"hostile_rate": rate, "internal_url": self.stack.internal_url},
            }[kind]
        window = None
        try:
            self.stack.sandbox_config(**change)
            window = self._note(kind, f"{change} for {hold:.1f}s")
            self._sleep(hold)
        finally:
            self.stack.sandbox_config(**CLEAN_SANDBOX)
            self._end(window)


class Supervisor:
    """Watches the worker and beat processes. A process that exited by itself (not by a fault) is
    counted; with `restart=True` it is started again after a second, as docker-compose.yml's
    `restart: unless-stopped` does for the worker and beat services."""

    def __init__(self, stack: Stack, restart: bool):
        self.stack = stack
        self.restart = restart
        self.stop = threading.Event()
        self.notes: list[str] = []
        self.thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            for service in [*self.stack.workers, self.stack.beat]:
                with self.stack.lock:
                    if self.stack.torn_down:
                        return
                    if service.process is None or service.running or service.name in self.stack.held_down or service.extra.get("given_up"):
                        continue
                    code = service.process.returncode
                    if service.extra.get("counted") != service.process.pid:
                        service.extra["counted"] = service.process.pid
                        self.stack.exits[service.name] += 1
                        last = [line for line in service.log_tail(20000).splitlines() if "CRITICAL" in line or "Unrecoverable" in line]
                        note = f"{service.name} (pid {service.process.pid}) exited by itself with code {code}" + (
                            f": {last[-1][:200]}" if last else ""
                        )
                        self.notes.append(note)
                        log(note + ("; restarting it" if self.restart else "; NOT restarting it (--no-supervise)"))
                    if not self.restart:
                        continue
                    try:
                        service.start()
                    except Exception as exc:
                        service.extra["given_up"] = True
                        log(f"supervisor could not restart {service.name}: {exc!r}")


# --- jobs --------------------------------------------------------------------------------------


def make_items(n: int, seed: int, image: Path) -> list[dict]:
    rng = random.Random(f"{seed}:prompts")
    run = uuid.uuid4().hex[:6]
    items = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(4))
        prompt = f"chaos soak {run} seed {seed} job {i:05d}: {words}"[:120]
        items.append({"image": str(image), "prompt": prompt, "size": "512*512", "seed": i, "idempotency_key": f"chaos-{run}-{i:05d}"})
    return items


def submit_wave(stack: Stack, publisher, items: list[dict], *, give_up_after: float = 120.0) -> tuple[dict[str, str], int]:
    """Submit like a careful producer: on an error (database down) retry the whole batch with the
    same idempotency keys, which can only return the jobs already created, never second ones."""
    from worker.producer import submit_edit_many

    deadline = time.monotonic() + give_up_after
    tries = 0
    while True:
        tries += 1
        try:
            jobs = submit_edit_many(items, settings=stack.settings, publisher=publisher)
            return {job.idempotency_key: job.id for job in jobs}, tries
        except Exception as exc:
            if time.monotonic() > deadline:
                log(f"wave of {len(items)} NOT submitted after {tries} tries: {exc!r}")
                return {}, tries
            log(f"wave submit failed ({type(exc).__name__}), retrying with the same idempotency keys")
            time.sleep(1.0)


def read_jobs(stack: Stack):
    from sqlalchemy import select

    from models import Job
    from worker.adapters.database import session_factory

    with session_factory(stack.settings.database_url)() as session:
        return list(session.scalars(select(Job)))


def histogram(jobs) -> dict[str, int]:
    hist: dict[str, int] = collections.Counter()
    for job in jobs:
        hist[job.state if not parked(job) else "needs_operator"] += 1
    return dict(sorted(hist.items()))


def parked(job) -> bool:
    return job.state == "submitting" and job.error_code == NEEDS_OPERATOR


def fmt_counts(counts: dict[str, int]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in sorted(counts.items())) + "}"


LOG_MARKERS = {
    "ambiguous_submits": "ambiguous submit, left for the reconciler",
    "adopted": "adopted provider task",
    "resubmitted_after_lookup": "provider has no task for the ambiguous submit",
    "needs_operator_marked": "ambiguous submit needs an operator",
    "breaker_opened": "circuit breaker open for",
    "half_open_waits": "half-open: waiting for the probe",
    "sweeps_skipped": "sweep skipped",
    "unrecoverable_worker_errors": "Unrecoverable error",
}


_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")
_JOB_ID = re.compile(r"job_id=([0-9a-f-]{36})")
_ANSWERED_STATUS = re.compile(r"\(HTTP [45]\d\d\)")


def _log_time(line: str) -> float | None:
    match = _LOG_TIME.search(line)
    if not match:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000


def ambiguous_paths(workdir: Path, stack: Stack, jobs) -> dict[str, tuple[float, str]]:
    """Jobs that took the ambiguous-submit path: job_id -> (when, what). From the workers' and
    beat's logs (a submit left for the reconciler, a task adopted), the audit trail (resubmitted
    after the provider's list showed none) and jobs parked for an operator."""
    found: dict[str, tuple[float, str]] = {}

    def note(job_id: str, when: float | None, what: str) -> None:
        if when is not None and (job_id not in found or when < found[job_id][0]):
            found[job_id] = (when, what)

    for path in [*workdir.glob("w*.log"), workdir / "beat.log"]:
        if not path.exists():
            continue
        with open(path, errors="replace") as handle:
            for line in handle:
                if "ambiguous submit, left for the reconciler" in line or "adopted provider task" in line:
                    job = _JOB_ID.search(line)
                    if job:
                        note(job.group(1), _log_time(line), line.split(": ", 1)[-1].strip()[:300])
    from sqlalchemy import select

    from models import JobEvent
    from worker.adapters.database import session_factory

    with session_factory(stack.settings.database_url)() as session:
        for event in session.scalars(select(JobEvent).where(JobEvent.reason.like("%provider has no task for the ambiguous submit%"))):
            note(event.job_id, event.at.timestamp(), event.reason)
    for job in jobs:
        if parked(job):
            note(job.id, job.updated_at.timestamp(), job.error_message or NEEDS_OPERATOR)
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


@dataclass
class LatencyReport:
    rows: dict[str, dict]  # kind -> {windows, jobs, ambiguous, suspect, p95, max}
    ambiguous: int
    answered_ambiguous: list[str]  # job ids whose ambiguous submit had an HTTP error answer: a bug
    beyond_p95: float
    beyond_max: float


def latency_report(chaos: Chaos, jobs, paths: dict[str, tuple[float, str]], http_timeout: float) -> LatencyReport:
    """Per fault kind: the jobs that took the ambiguous-submit path while a window of that kind was
    open, and how long jobs spent beyond their fault windows: finished_at minus the end of the last
    fault window their life overlapped (or minus created_at for a job no fault touched: "none"),
    attributed to that last window's kind."""
    now = time.time()
    windows = [(kind, start, end if end is not None else now) for kind, start, end in chaos.windows]
    rows: dict[str, dict] = {}

    def row(kind: str) -> dict:
        return rows.setdefault(kind, {"windows": 0, "jobs": 0, "ambiguous": 0, "suspect": 0, "beyond": []})

    for kind, _, _ in windows:
        row(kind)["windows"] += 1
    beyond_all: list[float] = []
    for job in jobs:
        if job.finished_at is None:
            continue
        created, finished = job.created_at.timestamp(), job.finished_at.timestamp()
        touching = [w for w in windows if w[1] <= finished and w[2] >= created]
        last = max(touching, key=lambda w: w[2]) if touching else None
        beyond = finished - max(created, last[2]) if last else finished - created
        entry = row(last[0] if last else "none")
        entry["jobs"] += 1
        entry["beyond"].append(max(0.0, beyond))
        beyond_all.append(max(0.0, beyond))
    answered_ambiguous = []
    # A submit may be left ambiguous up to http_timeout after it started, so a window counts a
    # little past its end.
    margin = http_timeout + 2.0
    for job_id, (when, what) in paths.items():
        active = {kind for kind, start, end in windows if start - 1.0 <= when <= end + margin}
        for kind in active or {"none"}:
            row(kind)["ambiguous"] += 1
        if _ANSWERED_STATUS.search(what):
            answered_ambiguous.append(job_id)
        elif active and active <= set(Chaos.ANSWERED):
            # Only faults that answer with an HTTP error were active: suspicious, flagged.
            for kind in active:
                row(kind)["suspect"] += 1
    for entry in rows.values():
        values = entry.pop("beyond")
        entry["p95"], entry["max"] = percentile(values, 0.95), max(values, default=0.0)
    return LatencyReport(rows, len(paths), answered_ambiguous, percentile(beyond_all, 0.95), max(beyond_all, default=0.0))


def format_latency(report: LatencyReport) -> list[str]:
    lines = [f"{'fault kind':<20} {'windows':>7} {'jobs':>6} {'ambiguous':>9} {'p95 beyond':>11} {'max beyond':>11}"]
    for kind in sorted(report.rows, key=lambda k: (k == "none", k)):
        r = report.rows[kind]
        flag = f"  FLAG: {r['suspect']} ambiguous under answered errors only" if r["suspect"] else ""
        lines.append(f"{kind:<20} {r['windows']:>7} {r['jobs']:>6} {r['ambiguous']:>9} {r['p95']:>10.1f}s {r['max']:>10.1f}s{flag}")
    return lines


def scan_logs(workdir: Path) -> dict[str, int]:
    """How often the workers and beat logged the recovery paths (a rough picture, for the report)."""
    counts = dict.fromkeys(LOG_MARKERS, 0)
    for path in [*workdir.glob("w*.log"), workdir / "beat.log"]:
        if not path.exists():
            continue
        with open(path, errors="replace") as handle:
            for line in handle:
                for name, marker in LOG_MARKERS.items():
                    if marker in line:
                        counts[name] += 1
    return counts


def cli_status(stack: Stack, job_id: str) -> str:
    try:
        # Wide columns: rich would otherwise wrap the event lines at 80 characters.
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "status", job_id, "--events"],
            env={**stack.env, "COLUMNS": "250"},
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return (result.stdout + result.stderr).rstrip()
    except Exception as exc:
        return f"(status failed: {exc!r})"


# --- the run -----------------------------------------------------------------------------------


def run(args) -> int:
    t_start = time.monotonic()
    hard_end = t_start + args.duration_limit
    workdir = Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    pgdir = Path("/tmp") / f"chaos-soak-pg-{uuid.uuid4().hex[:8]}"  # traversable by the postgres user
    stack = Stack(workdir, pgdir, args.seed, webhooks=args.webhooks)
    chaos: Chaos | None = None
    supervisor: Supervisor | None = None
    exit_code = 3
    keep = args.keep
    try:
        log(f"starting the stack in {workdir} (postgres in {pgdir})")
        stack.start()
        log(
            f"stack up in {time.monotonic() - t_start:.1f}s: redis :{stack.redis.port}, s3 :{stack.s3.port}, "
            f"sandbox :{stack.sandbox.port}, postgres :{stack.postgres.port}, workers {[w.process.pid for w in stack.workers]}"
        )
        from worker.adapters.redis_client import connect, server_version

        redis_version = ".".join(map(str, server_version(connect(stack.broker_url))))
        log(f"redis-server {redis_version} ({local.redis_server_binary()})")

        from PIL import Image

        image = workdir / "input.png"
        Image.new("RGB", (64, 64), (10, 120, 200)).save(image)
        items = make_items(args.jobs, args.seed, image)
        n_waves = max(3, min(10, args.jobs // 50))
        waves = [items[i::n_waves] for i in range(n_waves)]
        chaos_seconds = args.chaos_seconds or max(45.0, min(240.0, args.jobs * 0.25))

        from worker.engine.celery_app import make_app
        from worker.engine.publisher import CeleryPublisher

        publisher = CeleryPublisher(make_app(stack.settings))

        supervisor = Supervisor(stack, restart=args.supervise)
        supervisor.thread.start()
        t0 = time.monotonic()
        chaos = Chaos(stack, args.seed, end=t0 + chaos_seconds, t0=t0, only=set(args.faults.split(",")) if args.faults else None)
        chaos.start()
        log(f"{args.jobs} jobs in {n_waves} waves over {0.75 * chaos_seconds:.0f}s; faults for {chaos_seconds:.0f}s")

        submitted: dict[str, str] = {}
        submit_tries = 0
        last_report = 0.0
        for index, wave in enumerate(waves):
            at = t0 + index * (0.75 * chaos_seconds) / max(1, n_waves - 1)
            while time.monotonic() < at:
                time.sleep(min(1.0, at - time.monotonic()))
            ids, tries = submit_wave(stack, publisher, wave)
            submitted.update(ids)
            submit_tries += tries
            log(f"wave {index + 1}/{n_waves}: {len(ids)}/{len(wave)} jobs in ({tries} tr{'y' if tries == 1 else 'ies'})")

        # Wait: every job terminal (or parked for an operator), the faults over, within the limits.
        reserve = 60.0  # for the checks and teardown
        last_change = time.monotonic()
        last_hist: dict[str, int] = {}
        jobs = []
        while True:
            now = time.monotonic()
            try:
                jobs = read_jobs(stack)
            except Exception as exc:  # database restarting
                if now > hard_end - reserve:
                    raise
                log(f"cannot read jobs yet ({type(exc).__name__})")
                time.sleep(1.0)
                continue
            hist = histogram(jobs)
            if hist != last_hist:
                last_hist, last_change = hist, now
            if now - last_report >= 10:
                last_report = now
                log(f"t={now - t0:6.1f}s jobs {hist} faults {sum(chaos.counts.values())}")
            settled = len(jobs) >= len(submitted) and all(j.state in TERMINAL or parked(j) for j in jobs)
            if settled and chaos.done:
                break
            if now > hard_end - reserve:
                log("duration limit reached: checking what is there")
                break
            if chaos.done and now - last_change > args.stall_seconds:
                log(f"no job moved for {args.stall_seconds:.0f}s after the faults ended: checking what is there")
                break
            time.sleep(1.0)
        chaos.stop.set()
        chaos.join(60)
        elapsed = time.monotonic() - t0
        stack.sandbox_config(**CLEAN_SANDBOX)

        # --- checks ---
        jobs = read_jobs(stack)
        by_id = {job.id: job for job in jobs}
        stats = stack.sandbox_stats()
        tasks_by_id = {task["id"]: task for task in stats["tasks"]}
        per_prompt = collections.Counter(task["prompt"] for task in stats["tasks"])
        duplicates = {prompt: n for prompt, n in per_prompt.items() if n > 1}
        paid = stats["submissions"]

        unsubmitted = [it["idempotency_key"] for it in items if it["idempotency_key"] not in submitted]
        missing = [job_id for job_id in submitted.values() if job_id not in by_id]
        parked_jobs = [j for j in jobs if parked(j)]
        not_terminal = [j for j in jobs if j.state not in TERMINAL and not parked(j)]
        lost = len(not_terminal) + len(missing) + len(unsubmitted)
        succeeded = [j for j in jobs if j.state == "succeeded"]
        failed = [j for j in jobs if j.state == "failed"]
        cancelled = [j for j in jobs if j.state == "cancelled"]
        failed_reasons = collections.Counter(j.error_code or "unknown" for j in failed)

        import boto3

        from worker.adapters.storage import split_uri

        s3 = boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
        bytes_checked = 0
        bad_outputs: list[tuple[str, str]] = []
        wrong_task: list[tuple[str, str]] = []
        with httpx.Client(timeout=30) as http:
            for job in succeeded:
                task = tasks_by_id.get(job.prediction_id)
                if task is None or task["prompt"] != job.prompt:
                    wrong_task.append(
                        (job.id, f"prediction {job.prediction_id} was created for {task['prompt'] if task else 'no known task'!r}")
                    )
                if not job.outputs:
                    bad_outputs.append((job.id, "succeeded without outputs"))
                for index, uri in enumerate(job.outputs or []):
                    try:
                        bucket, key = split_uri(uri)
                        if key != f"{stack.settings.s3_prefix}/{job.id}/{index}.png" or bucket != stack.settings.s3_bucket:
                            bad_outputs.append((job.id, f"unexpected key {uri}"))
                            continue
                        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                        expected = http.get(f"{stack.sandbox_url}/outputs/{job.prediction_id}/{index}.png")
                        if expected.status_code != 200:
                            bad_outputs.append((job.id, f"provider output {index} answered {expected.status_code}"))
                        elif body != expected.content:
                            bad_outputs.append(
                                (job.id, f"{uri}: {len(body)} bytes in S3 differ from the provider's {len(expected.content)}")
                            )
                        else:
                            bytes_checked += len(body)
                    except Exception as exc:
                        bad_outputs.append((job.id, f"{uri}: {type(exc).__name__}: {exc}"))

        faults_total = sum(v for k, v in chaos.counts.items() if not k.endswith("_skipped"))
        fault_counts = {k: v for k, v in chaos.counts.items() if not k.endswith("_skipped")}
        failed_field = f"{len(failed)}{fmt_counts(failed_reasons)}"
        latency = latency_report(chaos, jobs, ambiguous_paths(workdir, stack, jobs), stack.settings.http_timeout)
        internal_hits = len(stack.internal.hits) if stack.internal else 0
        summary = (
            f"chaos: jobs={args.jobs} succeeded={len(succeeded)} failed={failed_field} paid_submissions={paid} "
            f"duplicates={len(duplicates)} lost={lost} needs_operator={len(parked_jobs)} "
            f"bytes_checked={bytes_checked} faults={faults_total}{fmt_counts(fault_counts)} "
            f"unexpected_exits={sum(stack.exits.values())}{fmt_counts(stack.exits)} elapsed={elapsed:.0f}s "
            f"ambiguous={latency.ambiguous} answered_ambiguous={len(latency.answered_ambiguous)} "
            f"beyond_p95={latency.beyond_p95:.1f}s beyond_max={latency.beyond_max:.1f}s internal_hits={internal_hits}"
        )
        latency_line = "chaos-latency: " + fmt_counts(
            {k: f"{r['windows']}/{r['jobs']}/{r['ambiguous']}/{r['p95']:.1f}/{r['max']:.1f}" for k, r in latency.rows.items()}
        )

        # --- details (stderr), with `edit-worker status --events` for a sample of problem jobs ---
        log(
            f"states {histogram(jobs)}; cancelled={len(cancelled)}; unsubmitted={len(unsubmitted)} missing_rows={len(missing)}; "
            f"producer tries={submit_tries}; sandbox counters: "
            + ", ".join(
                f"{k}={stats[k]}" for k in ("submissions", "submit_requests", "result_requests", "downloads", "cancels", "list_requests")
            )
        )
        log(
            f"provider tasks not belonging to any job prompt: "
            f"{sum(1 for t in stats['tasks'] if t['prompt'] not in {j.prompt for j in jobs})}; "
            f"attempts histogram {dict(sorted(collections.Counter(j.attempts for j in jobs).items()))}"
        )
        log("worker/beat log counts: " + ", ".join(f"{k}={v}" for k, v in scan_logs(workdir).items()))
        log("latency per fault kind (beyond = finished_at minus the end of the last fault window the job overlapped):")
        for line in format_latency(latency):
            log("  " + line)
        if latency.answered_ambiguous:
            log(
                f"BUG: {len(latency.answered_ambiguous)} job(s) took the ambiguous path on an answered HTTP error: {latency.answered_ambiguous[:5]}"
            )
        if internal_hits:
            log(f"BUG: the internal server was fetched {internal_hits} time(s): {stack.internal.hits[:5]}")
        log(f"hostile answers: {stats.get('hostile', {})}")
        if chaos.errors:
            log(f"fault lane errors: {chaos.errors}")
        for note in supervisor.notes:
            log(f"unexpected exit: {note}")
        for what, sample in (
            ("not terminal", [j.id for j in not_terminal]),
            ("needs operator", [j.id for j in parked_jobs]),
            ("duplicate submissions", [j.id for j in jobs if j.prompt in duplicates]),
            ("failed", [j.id for j in failed]),
            ("wrong provider task", [i for i, _ in wrong_task]),
            ("bad outputs", [i for i, _ in bad_outputs]),
        ):
            if not sample:
                continue
            log(f"{len(sample)} job(s) {what}; sample:")
            for job_id in sample[:3]:
                extra = [m for i, m in wrong_task + bad_outputs if i == job_id]
                job = by_id.get(job_id)
                if job is not None:  # the CLI's text form can swallow an error code as rich markup
                    extra.append(
                        f"db: state={job.state} error_code={job.error_code} attempts={job.attempts} prediction_id={job.prediction_id}"
                    )
                if job is not None and job.prompt in duplicates:
                    extra.append(
                        f"provider tasks for its prompt: {duplicates[job.prompt]}: "
                        + ", ".join(t["id"] for t in stats["tasks"] if t["prompt"] == job.prompt)
                    )
                print("\n".join(["  " + line for line in [*extra, *cli_status(stack, job_id).splitlines()]]), file=sys.stderr, flush=True)
        timeline = workdir / "faults.log"
        timeline.write_text("\n".join(chaos.timeline) + "\n")

        print(summary, flush=True)
        print(latency_line, flush=True)
        problems = lost > 0 or duplicates or bad_outputs or wrong_task or chaos.errors or latency.answered_ambiguous or internal_hits
        exit_code = 1 if problems else 0
        if problems:
            keep = True
        return exit_code
    except KeyboardInterrupt:
        log("interrupted: tearing down")
        exit_code = 130
        return exit_code
    finally:
        if chaos is not None:
            chaos.stop.set()
        if supervisor is not None:
            supervisor.stop.set()
        try:
            stack.teardown()
        finally:
            if chaos is not None:
                chaos.join(15)
            # A fault lane that was mid-restart when teardown began: make sure it is gone too.
            for service in stack.services():
                if service.running:
                    service.kill()
            if keep:
                log(f"logs kept in {workdir} (postgres data in {pgdir})")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
                shutil.rmtree(pgdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration-limit", type=float, default=900.0, help="hard limit for the whole run, seconds")
    parser.add_argument("--chaos-seconds", type=float, default=None, help="how long faults are injected (default: jobs/4, within 45..240)")
    parser.add_argument(
        "--stall-seconds", type=float, default=180.0, help="after the faults end, stop waiting when no job moved for this long"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) even on success")
    parser.add_argument(
        "--no-supervise",
        dest="supervise",
        action="store_false",
        help="do not restart a worker/beat process that exits by itself (default: restart it, "
        "like docker-compose.yml's `restart: unless-stopped`); such exits are counted either way",
    )
    parser.add_argument(
        "--webhooks",
        action="store_true",
        help="run `edit-worker api` and have the sandbox call each job's signed webhook URL "
        "(settles concurrent ambiguous submits that the task list cannot)",
    )
    parser.add_argument(
        "--faults",
        default="",
        help="comma-separated fault kinds to draw from (default all): " + ",".join(Chaos.INFRA + Chaos.PROVIDER),
    )
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.faults.split(","))) - set(Chaos.INFRA + Chaos.PROVIDER)
    if unknown:
        parser.error(f"unknown fault kind(s): {', '.join(sorted(unknown))}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    def _terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # Ctrl-C tears down too, even when started from a shell that left SIGINT ignored (`cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
