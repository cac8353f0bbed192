"""Integration fixtures: real redis-server, real PostgreSQL, a real S3 server (moto's), the sandbox
provider, and real `edit-worker worker` / `beat` processes — started once per session, cleaned
between tests (a fresh database, an empty Redis, a reset sandbox, a new bucket per test).

Set EDIT_WORKER_TEST_DATABASE_URL (an admin URL to an existing PostgreSQL server) to use that
server instead of starting one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
import redis as redis_lib
from botocore.config import Config as BotoConfig

from worker.config import Settings, settings_from_env
from worker.devtools import local

pytestmark = pytest.mark.integration


@dataclass
class Stack(local.StackURLs):
    workdir: Path
    redis: local.Service
    s3: local.Service
    sandbox: local.Service
    postgres: local.Service | None
    pg_admin_url: str


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    workdir = tmp_path_factory.mktemp("stack")
    started: list[local.Service] = []
    postgres = None
    try:
        redis = local.redis(workdir / "redis").start()
        started.append(redis)
        s3 = local.s3(workdir).start()
        started.append(s3)
        sandbox = local.sandbox(workdir, latency=1.0, extra_args=["--seed", "1"]).start()
        started.append(sandbox)
        admin = os.environ.get("EDIT_WORKER_TEST_DATABASE_URL")
        postgres = None
        if not admin:
            postgres = local.postgres(Path("/tmp") / f"edit-worker-pg-{uuid.uuid4().hex[:8]}").start()
            started.append(postgres)
            admin = postgres.extra["url"]
            local.wait_for_database(admin)
        yield Stack(workdir, redis, s3, sandbox, postgres, admin)
    finally:
        for service in reversed(started):
            service.stop()


@dataclass
class Cluster:
    """One test's slice of the stack: its own database, bucket and Redis db, plus its processes."""

    stack: Stack
    name: str
    env: dict[str, str]
    settings: Settings
    workdir: Path
    processes: list[local.Service] = field(default_factory=list)
    # A per-test S3 server (the `persistent_s3` marker) instead of the stack's moto server.
    s3_service: local.Service | None = None

    @property
    def s3_url(self) -> str:
        return self.env["S3_ENDPOINT_URL"]

    # --- processes ---
    def start_worker(self, name: str | None = None, concurrency: int = 2, **env) -> local.Service:
        worker = local.celery_worker(
            self.workdir, {**self.env, **env}, name=name or f"worker{len(self.processes)}", concurrency=concurrency
        )
        worker.start()
        self.processes.append(worker)
        return worker

    def start_beat(self) -> local.Service:
        beat = local.celery_beat(self.workdir, self.env).start()
        self.processes.append(beat)
        return beat

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "worker.cli", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"edit-worker {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    # --- producer side ---
    def publisher(self):
        from worker.engine.celery_app import make_app
        from worker.engine.publisher import CeleryPublisher

        return CeleryPublisher(make_app(self.settings))

    def submit(self, image: str, prompt: str, **kw):
        from worker.producer import submit_edit

        return submit_edit(image, prompt, settings=self.settings, publisher=self.publisher(), **kw)

    def sessions(self):
        from worker.adapters.database import session_factory

        return session_factory(self.settings.database_url)

    def jobs(self):
        from worker.core.jobs import list_jobs

        return list_jobs(self.sessions(), limit=100000)

    def wait_all_terminal(self, n: int, timeout: float = 120.0, poll: float = 0.5):
        """Wait until n jobs exist and all are terminal; returns them. Fails with a state histogram."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            if len(jobs) >= n and all(j.state in ("succeeded", "failed", "cancelled") for j in jobs):
                return jobs
            if time.monotonic() > deadline:
                hist: dict[str, int] = {}
                for j in jobs:
                    hist[j.state] = hist.get(j.state, 0) + 1
                logs = "\n".join(f"--- {p.name}\n{p.log_tail(3000)}" for p in self.processes)
                raise AssertionError(f"not all terminal after {timeout}s: {hist}\n{logs}")
            time.sleep(poll)

    # --- checks ---
    def sandbox_stats(self) -> dict:
        return httpx.get(f"{self.stack.sandbox_url}/_sandbox/stats", timeout=10).json()

    def sandbox_config(self, **changes) -> dict:
        return httpx.put(f"{self.stack.sandbox_url}/_sandbox/config", json=changes, timeout=10).json()

    def s3_client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
            config=BotoConfig(s3={"addressing_style": "path"}),
        )

    def assert_outputs_byte_equal(self, job) -> int:
        """Every output of a succeeded job is in S3 and byte-equal to what the provider serves."""
        from worker.adapters.storage import split_uri

        assert job.state == "succeeded", (job.id, job.state, job.error_code, job.error_message)
        assert job.outputs, job.id
        s3 = self.s3_client()
        checked = 0
        for index, uri in enumerate(job.outputs):
            bucket, key = split_uri(uri)
            assert bucket == self.settings.s3_bucket
            assert key == f"{self.settings.s3_prefix}/{job.id}/{index}.png"
            stored = s3.get_object(Bucket=bucket, Key=key)
            assert stored["ContentType"] == "image/png"
            body = stored["Body"].read()
            expected = httpx.get(f"{self.stack.sandbox_url}/outputs/{job.prediction_id}/{index}.png", timeout=10)
            assert expected.status_code == 200
            assert body == expected.content, f"S3 bytes differ from the provider's for {uri}"
            checked += len(body)
        return checked

    def assert_one_submission_per_job(self, jobs) -> None:
        stats = self.sandbox_stats()
        per_prompt: dict[str, int] = {}
        for task in stats["tasks"]:
            per_prompt[task["prompt"]] = per_prompt.get(task["prompt"], 0) + 1
        duplicates = {p: n for p, n in per_prompt.items() if n > 1}
        assert not duplicates, f"prompts submitted more than once: {duplicates}"
        assert stats["submissions"] == len(jobs), (stats["submissions"], len(jobs))

    # --- helpers for the fault tests ---
    def redis(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.env["CELERY_BROKER_URL"], decode_responses=True, socket_timeout=5)

    def states(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for job in self.jobs():
            hist[job.state] = hist.get(job.state, 0) + 1
        return hist

    def wait_until(self, predicate, timeout: float = 60.0, what: str = "condition", poll: float = 0.2):
        """Poll `predicate()` until it returns something truthy (returned); fail with `what` and the logs."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")
            time.sleep(poll)

    def wait_for_log(self, service: local.Service, text: str, timeout: float = 60.0) -> None:
        self.wait_until(lambda: text in service.log_tail(10**7), timeout, f"{text!r} in {service.name}'s log", poll=0.1)

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(chars)}" for p in self.processes)

    def all_logs(self) -> str:
        return "\n".join(p.log_tail(10**8) for p in self.processes)

    def events(self, job_id: str) -> list[tuple[str | None, str, str]]:
        from sqlalchemy import select

        from models import JobEvent

        with self.sessions()() as session:
            rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            return [(e.from_state, e.to_state, e.reason) for e in rows]

    def stop(self) -> None:
        # Ask every process to stop at once, then wait for each (a SIGKILL after 15 s).
        for process in reversed(self.processes):
            process.signal(process.stop_signal)
        for process in reversed(self.processes):
            if process.running:
                try:
                    process.process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.processes.clear()
        if self.s3_service is not None:
            self.s3_service.stop()


@pytest.fixture
def cluster(stack: Stack, tmp_path, request) -> Cluster:
    """A clean slice of the stack for one test. Fast timings: the sweep runs every second and
    treats a job as stuck after a few seconds, so recovery tests finish quickly."""
    name = "t_" + uuid.uuid4().hex[:10]
    db_url = local.create_database(stack.pg_admin_url, name)
    redis_lib.Redis.from_url(stack.broker_url).flushall()
    httpx.post(f"{stack.sandbox_url}/_sandbox/reset", timeout=10).raise_for_status()
    httpx.put(f"{stack.sandbox_url}/_sandbox/config", json=DEFAULT_SANDBOX, timeout=10).raise_for_status()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EDIT_WORKER_", "WAVESPEED_", "S3_", "AWS_"))},
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": stack.broker_url,
        "S3_ENDPOINT_URL": stack.s3_url,
        "S3_BUCKET": name.replace("_", "-"),
        "S3_PREFIX": "edits",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "WAVESPEED_API_KEY": "sandbox-key",
        "WAVESPEED_BASE_URL": stack.sandbox_url,
        "EDIT_WORKER_FIRST_POLL_DELAY": "1",
        "EDIT_WORKER_SWEEP_INTERVAL": "1",
        "EDIT_WORKER_STUCK_AFTER_SECONDS": "6",
        "EDIT_WORKER_HTTP_TIMEOUT": "5",
        "EDIT_WORKER_BACKOFF_BASE": "0.5",
        "EDIT_WORKER_BACKOFF_MAX": "4",
        "EDIT_WORKER_BREAKER_OPEN_SECONDS": "3",
        "EDIT_WORKER_POLL_LEASE_SECONDS": "8",
        "PYTHONUNBUFFERED": "1",
    }
    for marker in request.node.iter_markers("worker_env"):
        env.update(marker.kwargs)
    s3_service = None
    if request.node.get_closest_marker("persistent_s3"):
        # rclone's S3 server over a directory of this test: objects survive a stop/start.
        s3_service = local.s3_persistent(tmp_path / "s3-persistent").start()
        env["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{s3_service.port}"
    settings = settings_from_env(env)
    from worker.adapters.database import migrate
    from worker.adapters.storage import Storage

    c = Cluster(stack, name, env, settings, tmp_path, s3_service=s3_service)
    try:
        migrate(settings.database_url)
        Storage.from_settings(settings).ensure_bucket()
        yield c
    finally:
        c.stop()


DEFAULT_SANDBOX = {
    "latency": 1.0,
    "fail_rate": 0.0,
    "submit_error_rate": 0.0,
    "result_error_rate": 0.0,
    "slow_submit_rate": 0.0,
    "download_fail_rate": 0.0,
    "outage": False,
    "auth_failure": False,
    "submit_error_status": 500,
    "slow_submit_seconds": 30.0,
    "hostile_rate": 0.0,
    "hostile_kinds": "",
}


@pytest.fixture
def sample_image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (10, 120, 200)).save(path)
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "worker_env(**env): extra environment for the cluster's processes")
    config.addinivalue_line("markers", "persistent_s3: give the cluster its own S3 server (rclone) that keeps objects across a restart")
