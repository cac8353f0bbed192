#!/usr/bin/env python
"""Callback delivery figures: the whole stack on 127.0.0.1 (redis-server, PostgreSQL, an S3 server,
the sandbox provider, a Celery worker and beat, from worker/devtools/local.py) finishing jobs that
carry a callback_url, and a real HTTP receiver in this process that errs and hangs now and then and
is down for a while in the middle.

    python bench/callbacks_bench.py --jobs 20 --down 60 [--retry-window 30] [--seed 1]

Timeline: wave A (half the jobs) with the receiver up; then the receiver goes down for --down
seconds: wave B's first half finishes at the start of the outage (its retries run out: the retry
window is shorter than the outage), its second half near the end (delivered by retries once the
receiver is back). After the receiver returns and the retries drain, the operator runs
`edit-worker callbacks redeliver --failed`. Prints one line

  callbacks: jobs=… deliveries=… delivered=… first_try=… after_retries=… gave_up=… redelivered=…
             requests=… duplicates=… invalid_signatures=… lost=… latency_p50=…s latency_p95=…s
             drain_after_up=…s elapsed=…s

and exits non-zero if any delivery was lost or any request carried an invalid signature.
latency is from the job's terminal state to its delivery, for deliveries not hit by the outage.
"""

from __future__ import annotations

import argparse
import base64
import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import standardwebhooks  # noqa: E402
from sqlalchemy import select, update  # noqa: E402

from worker.config import settings_from_env  # noqa: E402
from worker.devtools import local  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"callbacks-bench-key-32-bytes-xx!").decode()
T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


class Receiver:
    """A producer's endpoint: verifies and records every request; answers 500 with probability
    `error_rate`, hangs past the sender's timeout with probability `hang_rate`, else 204."""

    def __init__(self, port: int, *, error_rate: float, hang_rate: float, hang_seconds: float, seed: int):
        self.port = port
        self.error_rate, self.hang_rate, self.hang_seconds = error_rate, hang_rate, hang_seconds
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.received: list[tuple[str, int]] = []  # (webhook-id, status answered)
        self.invalid = 0
        self.verifier = standardwebhooks.Webhook(SECRET)
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/edits"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    roll = receiver.rng.random()
                    status = 500 if roll < receiver.error_rate else 204
                    hang = receiver.error_rate <= roll < receiver.error_rate + receiver.hang_rate
                    try:
                        receiver.verifier.verify(body, headers)
                        # A hung request was processed too (answered late): the sender retries it.
                        receiver.received.append((headers["webhook-id"], status))
                    except standardwebhooks.WebhookVerificationError:
                        receiver.invalid += 1
                if hang:
                    time.sleep(receiver.hang_seconds)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run(args) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="callbacks-bench-"))
    pgdir = Path("/tmp") / f"callbacks-bench-pg-{uuid.uuid4().hex[:8]}"
    services: list[local.Service] = []
    receiver = Receiver(
        local.free_port(), error_rate=args.error_rate, hang_rate=args.hang_rate, hang_seconds=args.timeout + 1, seed=args.seed
    )
    try:
        redis = local.redis(workdir / "redis").start()
        services.append(redis)
        s3 = local.s3(workdir).start()
        services.append(s3)
        sandbox = local.sandbox(workdir, latency=1.0, outputs="flat", extra_args=["--seed", str(args.seed)]).start()
        services.append(sandbox)
        postgres = local.postgres(pgdir).start()
        services.append(postgres)
        local.wait_for_database(postgres.extra["url"])
        db_url = local.create_database(postgres.extra["url"], "callbacks")
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("EDIT_WORKER_", "WAVESPEED_", "S3_", "AWS_", "CELERY_", "DATABASE_URL"))
            },
            "DATABASE_URL": db_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis.port}/0",
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}",
            "S3_BUCKET": "callbacks-bench",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "WAVESPEED_API_KEY": "sandbox-key",
            "WAVESPEED_BASE_URL": f"http://127.0.0.1:{sandbox.port}",
            "EDIT_WORKER_FIRST_POLL_DELAY": "1",
            "EDIT_WORKER_SWEEP_INTERVAL": "1",
            "EDIT_WORKER_RATE_LIMIT_PER_MINUTE": "1000000",
            "EDIT_WORKER_ALLOW_PRIVATE_URLS": "true",  # the receiver is on 127.0.0.1
            "EDIT_WORKER_CALLBACK_SECRET": SECRET,
            "EDIT_WORKER_CALLBACK_TIMEOUT": str(args.timeout),
            "EDIT_WORKER_CALLBACK_BACKOFF_BASE": str(args.backoff_base),
            "EDIT_WORKER_CALLBACK_BACKOFF_MAX": str(args.backoff_max),
            "EDIT_WORKER_CALLBACK_RETRY_SECONDS": str(args.retry_window),
            "PYTHONUNBUFFERED": "1",
        }
        settings = settings_from_env(env)
        from worker.adapters.database import migrate, session_factory
        from worker.adapters.storage import Storage
        from worker.engine.celery_app import make_app
        from worker.engine.publisher import CeleryPublisher
        from worker.producer import submit_edit

        migrate(db_url)
        Storage.from_settings(settings).ensure_bucket()
        worker = local.celery_worker(workdir, env, name="w1", concurrency=4)
        worker.cwd = str(ROOT)
        services.append(worker.start())
        beat = local.celery_beat(workdir, env)
        beat.cwd = str(ROOT)
        services.append(beat.start())
        sessions = session_factory(db_url)
        publisher = CeleryPublisher(make_app(settings))
        image = workdir / "input.png"
        from PIL import Image

        Image.new("RGB", (64, 64), (10, 120, 200)).save(image)

        from models import CallbackDelivery, Job

        def submit(n: int, label: str) -> list[str]:
            ids = []
            for i in range(n):
                job = submit_edit(str(image), f"callbacks bench {label} {i}", size="512*512", settings=settings, publisher=publisher)
                with sessions() as session:  # the producer API takes no callback_url yet
                    session.execute(update(Job).where(Job.id == job.id).values(callback_url=receiver.url))
                    session.commit()
                ids.append(job.id)
            return ids

        def rows() -> list:
            with sessions() as session:
                return list(session.execute(select(CallbackDelivery, Job.finished_at).join(Job, Job.id == CallbackDelivery.job_id)))

        def wait(what: str, predicate, timeout: float) -> float:
            began = time.monotonic()
            while not predicate():
                if time.monotonic() - began > timeout:
                    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
                time.sleep(0.25)
            return time.monotonic() - began

        def settled(ids: list[str], status: str | None = None) -> bool:
            found = {d.job_id: d.status for d, _ in rows() if d.job_id in ids}
            return len(found) == len(ids) and all((s != "pending") if status is None else (s == status) for s in found.values())

        started = time.monotonic()
        receiver.start()
        half = max(1, args.jobs // 2)
        wave_a = submit(half, "A")
        log(f"wave A: {len(wave_a)} jobs, receiver up")
        wait("wave A delivered", lambda: settled(wave_a, "delivered"), 120)

        receiver.stop()
        down_at = time.monotonic()
        rest = args.jobs - half
        early = submit(rest // 2, "B-early")
        log(f"receiver down for {args.down:.0f}s; wave B early: {len(early)} jobs")
        time.sleep(max(0.0, args.down - args.retry_window / 2 - (time.monotonic() - down_at)))
        late = submit(rest - len(early), "B-late")
        log(f"wave B late: {len(late)} jobs")
        time.sleep(max(0.0, args.down - (time.monotonic() - down_at)))
        receiver.start()
        log("receiver up again")
        drain = wait("retries to drain", lambda: settled(wave_a + early + late), 120)
        gave_up_ids = [d.job_id for d, _ in rows() if d.status == "failed"]
        log(f"retries drained in {drain:.1f}s; {len(gave_up_ids)} gave up; operator redelivers them")
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "callbacks", "redeliver", "--failed", "--json"],
            env=env,
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise SystemExit(f"redeliver failed: {result.stderr}")
        wait("redeliveries", lambda: settled(wave_a + early + late, "delivered"), 120)
        elapsed = time.monotonic() - started

        final = rows()
        with receiver.lock:
            received = list(receiver.received)
            invalid = receiver.invalid
        counts = collections.Counter(webhook_id for webhook_id, _ in received)
        lost = sum(1 for d, _ in final if d.webhook_id not in counts)
        duplicates = sum(1 for d, _ in final if sum(1 for w, s in received if w == d.webhook_id and 200 <= s < 300) > 1)
        redelivered = [d for d, _ in final if d.job_id in gave_up_ids]
        others = [d for d, _ in final if d.job_id not in gave_up_ids]
        first_try = sum(1 for d in others if d.attempts == 1)
        latencies = [(d.delivered_at - finished).total_seconds() for d, finished in final if d.job_id in wave_a and finished is not None]
        states = collections.Counter(d.state for d, _ in final)
        print(
            f"callbacks: jobs={args.jobs} states={dict(sorted(states.items()))} deliveries={len(final)} "
            f"delivered={sum(1 for d, _ in final if d.status == 'delivered')} first_try={first_try} "
            f"after_retries={len(others) - first_try} gave_up={len(gave_up_ids)} redelivered={len(redelivered)} "
            f"requests={len(received)} duplicates={duplicates} invalid_signatures={invalid} lost={lost} "
            f"latency_p50={percentile(latencies, 0.5):.2f}s latency_p95={percentile(latencies, 0.95):.2f}s "
            f"drain_after_up={drain:.1f}s elapsed={elapsed:.0f}s",
            flush=True,
        )
        return 1 if lost or invalid else 0
    finally:
        receiver.stop()
        for service in reversed(services):
            try:
                service.stop(timeout=10)
            except Exception:
                service.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(pgdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--down", type=float, default=60.0, help="Seconds the receiver is down.")
    parser.add_argument("--retry-window", type=float, default=30.0, help="EDIT_WORKER_CALLBACK_RETRY_SECONDS for the run.")
    parser.add_argument("--backoff-base", type=float, default=1.0)
    parser.add_argument("--backoff-max", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=2.0, help="EDIT_WORKER_CALLBACK_TIMEOUT for the run.")
    parser.add_argument("--error-rate", type=float, default=0.1, help="Share of requests the receiver answers 500.")
    parser.add_argument("--hang-rate", type=float, default=0.05, help="Share it answers only after the sender's timeout.")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.retry_window >= args.down:
        parser.error("--retry-window must be shorter than --down (some deliveries must run out of retries)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
