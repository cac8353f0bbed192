"""The blocking baseline for bench/scale.py: a plain Celery task that submits one edit, then
sleep-polls the result the way an SDK's `run()` does, copies the outputs to S3 and records completion.

    celery -A bench.baseline worker -Q baseline --concurrency C      (started by bench/scale.py)

Deliberately the straightforward way, not a strawman: one pooled httpx client, one boto3 client and
one PostgreSQL connection per pool process (made after the fork), acks on receipt, prefetch 1. What
it does not have is the edit worker's design: it holds a worker slot for the whole inference, so it
drains at about `processes * concurrency / (latency + overhead)` jobs per second.

Configuration comes from the environment (set by bench/scale.py): CELERY_BROKER_URL,
WAVESPEED_BASE_URL, WAVESPEED_API_KEY, S3_ENDPOINT_URL, S3_BUCKET, AWS_*, BASELINE_DATABASE_URL
(a plain libpq URL), BASELINE_POLL_INTERVAL (default 2 s).
"""

from __future__ import annotations

import io
import os
import time
import uuid

from celery import Celery
from celery.signals import worker_process_init

QUEUE = "baseline"
TASK = "baseline.edit"
MODEL_PATH = "/api/v3/bytedance/dreamina-v3.0/edit"
TERMINAL = ("completed", "failed", "cancelled", "timeout", "deleted")

app = Celery("bench_baseline", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,
    result_backend=None,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
    timezone="UTC",
    enable_utc=True,
)

# One of each per pool process, created lazily after the fork.
_clients: dict = {}


@worker_process_init.connect
def _after_fork(**_kw) -> None:
    _clients.clear()


def _http():
    import httpx

    if "http" not in _clients:
        _clients["http"] = httpx.Client(
            base_url=os.environ["WAVESPEED_BASE_URL"],
            timeout=60.0,
            headers={"Authorization": f"Bearer {os.environ.get('WAVESPEED_API_KEY', 'sandbox-key')}"},
        )
    return _clients["http"]


def _s3():
    import boto3

    if "s3" not in _clients:
        _clients["s3"] = boto3.session.Session().client(
            "s3",
            endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )
    return _clients["s3"]


def _db():
    import psycopg

    conn = _clients.get("db")
    if conn is None or conn.closed:
        conn = _clients["db"] = psycopg.connect(os.environ["BASELINE_DATABASE_URL"], autocommit=True)
    return conn


SCHEMA = """
CREATE TABLE IF NOT EXISTS baseline_results (
    job_id      text PRIMARY KEY,
    prompt      text NOT NULL,
    state       text NOT NULL,
    created_at  double precision NOT NULL,   -- epoch seconds when the producer enqueued it
    started_at  double precision NOT NULL,   -- when a worker slot picked it up
    finished_at double precision NOT NULL,
    provider_calls integer NOT NULL,
    outputs     integer NOT NULL
)
"""


@app.task(name=TASK)
def edit(job_id: str, created_at: float, prompt: str, image: str, size: str, seed: int) -> str:
    started = time.time()
    http = _http()
    poll_interval = float(os.environ.get("BASELINE_POLL_INTERVAL", "2"))
    calls = 1
    answer = http.post(MODEL_PATH, json={"prompt": prompt, "image": image, "size": size, "seed": seed})
    answer.raise_for_status()
    data = answer.json()["data"]
    prediction_id = data["id"]
    # The SDK way: ask, and if it is not done, hold this worker slot asleep until the next ask.
    while data.get("status") not in TERMINAL:
        time.sleep(poll_interval)
        calls += 1
        answer = http.get(f"/api/v3/predictions/{prediction_id}/result")
        answer.raise_for_status()
        data = answer.json()["data"]
    stored = 0
    if data["status"] == "completed":
        bucket = os.environ["S3_BUCKET"]
        prefix = os.environ.get("S3_PREFIX", "baseline")
        for index, url in enumerate(data.get("outputs") or []):
            calls += 1
            body = http.get(url)
            body.raise_for_status()
            _s3().put_object(
                Bucket=bucket,
                Key=f"{prefix}/{job_id}/{index}.png",
                Body=io.BytesIO(body.content),
                ContentType=body.headers.get("content-type", "image/png"),
            )
            stored += 1
    state = "succeeded" if data["status"] == "completed" else "failed"
    _db().execute(
        "INSERT INTO baseline_results (job_id, prompt, state, created_at, started_at, finished_at, provider_calls, outputs) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (job_id) DO NOTHING",
        (job_id, prompt, state, created_at, started, time.time(), calls, stored),
    )
    return state


def enqueue(n: int, *, image: str, size: str, label: str) -> float:
    """Publish n baseline jobs (the image is sent inline, as base64); returns the enqueue time."""
    now = time.time()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task(TASK, args=[str(uuid.uuid4()), now, f"baseline {label} job {i}", image, size, i], queue=QUEUE, producer=producer)
    return now
