#!/usr/bin/env python
"""Admission benchmark: how fast the producer side takes jobs in, without workers.

    python bench/admission.py --producer many --jobs 4000                 # submit_edit_many in batches
    python bench/admission.py --producer one --jobs 500 --rate 100        # one submit_edit at a time, steady rate
    python bench/admission.py --producer http --jobs 4000                 # POST /jobs/batch to `edit-worker api`
    python bench/admission.py --producer many --jobs 100000 --rss         # + the producer's RSS while it admits

bench/scale.py uses the same functions (`--producer`, `--rate`, `--admission-only`). Starts its own
PostgreSQL, Redis and S3 server on 127.0.0.1 (scale.Stack), a fresh database per run; the jobs
stay queued (no worker runs). Measured: jobs/s of admission (first call to last return), per-call
latency p50/p95/p99 and the producer's CPU per call (`one`), the producer's peak RSS (`--rss`).
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# ADMISSION_CODE_ROOT=/path/to/another/checkout measures that checkout's producer with this harness
# (a before/after in one session); default: this checkout.
CODE_ROOT = Path(os.environ.get("ADMISSION_CODE_ROOT") or ROOT).resolve()
sys.path.insert(0, str(CODE_ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from worker.config import settings_from_env  # noqa: E402
from worker.devtools import local  # noqa: E402

PRODUCERS = ("many", "one", "http")


def log(message: str) -> None:
    print(f"[admission {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def input_image(outdir: Path) -> Path:
    image = outdir / "input.png"
    if not image.exists():
        from PIL import Image

        outdir.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (10, 120, 200)).save(image)
    return image


def make_items(image: Path, jobs: int, size: str, label: str) -> list[dict[str, Any]]:
    return [{"image": str(image), "prompt": f"bench {label} job {i}", "size": size, "seed": i} for i in range(jobs)]


class RssSampler(threading.Thread):
    """This process's RSS every `interval` seconds (peak and the samples, MiB)."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True, name="rss")
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - t0, self._proc.memory_info().rss / 2**20))
            self._stop.wait(self.interval)

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self.join()
        values = [mib for _, mib in self.samples]
        if not values:
            return {}
        tenth = max(1, len(values) // 10)
        return {
            "rss_first_mib": round(values[0], 1),
            "rss_after_first_tenth_mib": round(max(values[:tenth]), 1),
            "rss_peak_mib": round(max(values), 1),
            "rss_last_mib": round(values[-1], 1),
        }


def admit_many(items: list[dict[str, Any]], settings, publisher, batch_size: int) -> dict[str, Any]:
    """submit_edit_many in slices of `batch_size` (one call each, as a producer streaming a backlog
    in would; the list of returned jobs is dropped per call, so memory measures the producer)."""
    from worker.producer import submit_edit_many

    calls: list[float] = []
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for start in range(0, len(items), batch_size):
        c0 = time.perf_counter()
        submit_edit_many(items[start : start + batch_size], settings=settings, publisher=publisher, batch_size=batch_size)
        calls.append(time.perf_counter() - c0)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {
        "producer": "many",
        "jobs": len(items),
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "jobs_per_second": round(len(items) / seconds, 1),
        "ms_per_batch_p50": _ms(percentile(calls, 50)),
        "producer_cpu_ms_per_job": round(cpu / len(items) * 1000, 3),
    }


def admit_one(items: list[dict[str, Any]], settings, publisher, rate: float) -> dict[str, Any]:
    """One submit_edit per job at a steady `rate` jobs/s (0: back to back): per-call latency and
    the producer's CPU per call."""
    from worker.producer import submit_edit

    interval = 1.0 / rate if rate > 0 else 0.0
    # The first call pays one-time costs (Celery loads its transport, the pool connects): a
    # warm-up, not timed.
    submit_edit(**items[0], settings=settings, publisher=publisher)
    items = items[1:]
    latencies: list[float] = []
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    behind = 0
    for i, item in enumerate(items):
        due = t0 + i * interval
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif interval and wait < -interval:
            behind += 1
        c0 = time.perf_counter()
        submit_edit(**item, settings=settings, publisher=publisher)
        latencies.append(time.perf_counter() - c0)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {
        "producer": "one",
        "jobs": len(items),  # timed calls (one more went first, untimed)
        "rate": rate,
        "seconds": round(seconds, 3),
        "jobs_per_second": round(len(items) / seconds, 1),
        "ms_per_call_p50": _ms(percentile(latencies, 50)),
        "ms_per_call_p95": _ms(percentile(latencies, 95)),
        "ms_per_call_p99": _ms(percentile(latencies, 99)),
        "producer_cpu_ms_per_call": round(cpu / len(items) * 1000, 3),
        "calls_late_by_more_than_one_interval": behind,
    }


def admit_http(items: list[dict[str, Any]], api_url: str, key: str, batch_size: int) -> dict[str, Any]:
    """POST /jobs/batch in slices of `batch_size` (images as base64, as a remote caller sends them)."""
    encoded: dict[str, str] = {}
    bodies = []
    for start in range(0, len(items), batch_size):
        batch = []
        for item in items[start : start + batch_size]:
            path = item["image"]
            if path not in encoded:
                encoded[path] = base64.b64encode(Path(path).read_bytes()).decode()
            batch.append({**item, "image": encoded[path]})
        bodies.append({"jobs": batch})
    latencies = []
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        t0 = time.perf_counter()
        for body in bodies:
            c0 = time.perf_counter()
            response = client.post("/jobs/batch", json=body)
            latencies.append(time.perf_counter() - c0)
            if response.status_code != 201:
                raise RuntimeError(f"POST /jobs/batch answered {response.status_code}: {response.text[:500]}")
        seconds = time.perf_counter() - t0
    return {
        "producer": "http",
        "jobs": len(items),
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "jobs_per_second": round(len(items) / seconds, 1),
        "ms_per_request_p50": _ms(percentile(latencies, 50)),
        "ms_per_request_p95": _ms(percentile(latencies, 95)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def start_api(env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen, str]:
    """`edit-worker api` on a free port (uvicorn, one process), with the producer's environment."""
    port = local.free_port()
    log_file = open(workdir / "api.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=str(workdir),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    local.wait_for_port(port, timeout=60, process=proc, name="edit-worker api", log=workdir / "api.log")
    return proc, f"http://127.0.0.1:{port}"


def prepare(stack, env: dict[str, str], label: str) -> tuple[dict[str, str], Any]:
    """A fresh database (migrated) and bucket for one run: the producer's environment and settings."""
    from worker.adapters.database import migrate

    db = f"adm_{label}_{uuid.uuid4().hex[:6]}".replace("-", "_")
    local.create_database(stack.pg_url(), db)
    migrate(stack.pg_url(db))
    bucket = f"adm-{label}-{uuid.uuid4().hex[:6]}".replace("_", "-").lower()
    import boto3

    boto3.client(
        "s3", endpoint_url=stack.s3_url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket=bucket)
    producer_env = {**env, "DATABASE_URL": stack.pg_url(db), "S3_BUCKET": bucket}
    return producer_env, settings_from_env(producer_env)


def run(stack, env: dict[str, str], args, outdir: Path, label: str) -> dict[str, Any]:
    """One admission measurement (args.producer, args.jobs, args.batch_size, args.rate, args.size) on
    a fresh database: the result dict."""
    from worker.engine.celery_app import make_app
    from worker.engine.publisher import CeleryPublisher

    producer_env, settings = prepare(stack, env, label)
    items = make_items(input_image(outdir), args.jobs, args.size, label)
    publisher = CeleryPublisher(make_app(settings))
    sampler = RssSampler() if getattr(args, "rss", False) else None
    if sampler:
        sampler.start()
    log(f"{label}: admitting {args.jobs} jobs ({args.producer})")
    if args.producer == "many":
        result = admit_many(items, settings, publisher, args.batch_size)
    elif args.producer == "one":
        result = admit_one(items, settings, publisher, args.rate)
    else:
        from worker.adapters.database import session_factory
        from worker.core.tenants import create_key

        key = create_key(session_factory(settings.database_url), "bench", admin=False).key.get_secret_value()
        proc, url = start_api({**producer_env, "EDIT_WORKER_TENANT_RATE_PER_MINUTE": "0"}, outdir)
        try:
            result = admit_http(items, url, key, min(args.batch_size, 1000))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if sampler:
        result.update(sampler.finish())
    result["label"] = label
    result["database_url"] = producer_env["DATABASE_URL"]
    log(f"{label}: {result}")
    return result


def base_env(stack) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EDIT_WORKER_", "WAVESPEED_", "S3_", "AWS_", "DATABASE_URL", "CELERY_"))
    }
    env.update(
        {
            "PYTHONPATH": str(CODE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
            "CELERY_BROKER_URL": stack.broker_url,
            "S3_ENDPOINT_URL": stack.s3_url,
            "S3_PREFIX": "edits",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "WAVESPEED_API_KEY": "sandbox-key",
        }
    )
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The admission options (bench/scale.py takes the same)."""
    p.add_argument(
        "--producer",
        choices=PRODUCERS,
        default="many",
        help="how jobs arrive: many = submit_edit_many batches; one = one submit_edit at a time at --rate; http = POST /jobs/batch",
    )
    p.add_argument("--rate", type=float, default=100.0, help="--producer one: jobs per second, steady (0: back to back)")


def main(argv: list[str] | None = None) -> int:
    import shutil

    from scale import Stack  # type: ignore[import-not-found]  # bench/ is on sys.path when run as a script

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--size", default="512*512")
    p.add_argument("--rss", action="store_true", help="sample the producer's RSS while it admits")
    p.add_argument("--repeat", type=int, default=1, help="runs of the same measurement, each on a fresh database")
    p.add_argument("--s3", choices=("moto", "rclone"), default="rclone" if shutil.which("rclone") else "moto")
    add_arguments(p)
    args = p.parse_args(argv)
    args.latency = 0.0
    outdir = ROOT / "bench" / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-admission-{args.producer}"
    outdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(outdir / "stack")
    try:
        stack.redis = stack._start(local.redis(stack.workdir / "redis"))
        stack.s3 = stack._start(local.s3_persistent(stack.workdir) if args.s3 == "rclone" else local.s3(stack.workdir))
        stack._start_postgres()
        env = base_env(stack)
        for i in range(args.repeat):
            print(run(stack, env, args, outdir, f"{args.producer}{i}"), flush=True)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
