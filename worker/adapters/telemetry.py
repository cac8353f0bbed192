"""Counters and histograms the worker processes record, and how they reach `/metrics`.

Events happen in Celery worker processes (several per host, several hosts) while `/metrics` is
served by `edit-worker api`. Each process records into a `Recorder`: plain in-memory sums under a
lock (no I/O on the hot path). A flusher (`Flusher`: a daemon thread, every
EDIT_WORKER_METRICS_FLUSH_SECONDS, and once more at shutdown) moves the deltas into one Redis hash
with HINCRBYFLOAT in one pipeline; the API's collector (worker/metrics.py) reads that hash with
one HGETALL per scrape. The hash holds fleet-wide totals since it was created: a lost Redis resets
them, which Prometheus treats as a counter reset. A process that dies without flushing loses at
most one interval of events.

Labels are bounded: states, error codes, provider operations and outcomes are closed sets;
tenants are labelled only when listed in EDIT_WORKER_METRICS_TENANTS (others are `other`); never
a job id. `CATALOG` is the one definition of every metric (name, type, labels, help, buckets):
docs/metrics.md is generated from it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from worker.adapters.redis_keys import DEFAULT_NAMESPACE, RedisKeys

log = logging.getLogger(__name__)

OTHER = "other"

# Seconds: from a fast edit (a few seconds) to a job that waited out its deadline (an hour).
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
INFERENCE_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class MetricDef:
    name: str  # a counter's name ends in _total; a histogram's in _seconds
    kind: str  # counter | histogram | gauge
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    source: str = "workers"  # workers (flushed through Redis) | api (read at scrape time)


JOBS_CREATED = MetricDef("edit_worker_jobs_created_total", "counter", "Jobs created (admitted), by tenant.", ("tenant",))
JOBS_FINISHED = MetricDef(
    "edit_worker_jobs_finished_total",
    "counter",
    "Jobs that reached a terminal state, by state (succeeded, failed, cancelled), error code (empty unless failed) and tenant.",
    ("state", "error_code", "tenant"),
)
QUEUE_WAIT = MetricDef(
    "edit_worker_job_queue_wait_seconds",
    "histogram",
    "Schedule-to-start: seconds from a job's creation to the provider accepting its submission.",
    (),
    DURATION_BUCKETS,
)
INFERENCE = MetricDef(
    "edit_worker_provider_inference_seconds",
    "histogram",
    "The provider's reported inference time of completed predictions (seconds).",
    (),
    INFERENCE_BUCKETS,
)
END_TO_END = MetricDef(
    "edit_worker_job_duration_seconds",
    "histogram",
    "End to end: seconds from a job's creation to its terminal state, by state.",
    ("state",),
    DURATION_BUCKETS,
)
PROVIDER_REQUESTS = MetricDef(
    "edit_worker_provider_requests_total",
    "counter",
    "Requests to the provider by operation (submit, result, cancel, list, download) and outcome "
    "(ok, transient, ambiguous, permanent, auth).",
    ("operation", "outcome"),
)
CALLBACK_DELIVERIES = MetricDef(
    "edit_worker_callback_deliveries_total",
    "counter",
    "Callback delivery tries by outcome (delivered, retried: failed and tried again later, failed: given up).",
    ("outcome",),
)
TRANSITIONS = MetricDef(
    "edit_worker_transitions_total", "counter", "Job state transitions (committed), by source and target state.", ("from_state", "to_state")
)

CATALOG: tuple[MetricDef, ...] = (
    JOBS_CREATED,
    JOBS_FINISHED,
    QUEUE_WAIT,
    INFERENCE,
    END_TO_END,
    PROVIDER_REQUESTS,
    CALLBACK_DELIVERIES,
    TRANSITIONS,
)
BY_NAME = {m.name: m for m in CATALOG}


def field(name: str, labels: dict[str, str]) -> str:
    """The Redis hash field of one sample (a sample name such as `x_bucket` and its labels)."""
    return json.dumps([name, labels], sort_keys=True, separators=(",", ":"))


def parse_field(raw: str) -> tuple[str, dict[str, str]] | None:
    try:
        name, labels = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(name, str) or not isinstance(labels, dict):
        return None
    return name, {str(k): str(v) for k, v in labels.items()}


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Recorder:
    """In-memory sums of every counter and histogram sample, keyed by Redis hash field; `take()`
    hands over the deltas since the last take (the flusher's input). Thread-safe; no I/O."""

    def __init__(self, *, tenants: Iterable[str] = (), clock: Callable[[], float] = time.monotonic):
        self.tenants = frozenset(tenants)
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}

    # --- the domain's events --------------------------------------------------------------

    def tenant_label(self, tenant: str | None) -> str:
        return tenant if tenant in self.tenants else OTHER

    def job_created(self, tenant: str | None) -> None:
        self._inc(JOBS_CREATED, {"tenant": self.tenant_label(tenant)})

    def job_moved(self, src: str, dst: str, *, tenant: str | None, error_code: str | None, age_seconds: float | None) -> None:
        """A committed transition `src -> dst` of a job `age_seconds` after its creation."""
        self._inc(TRANSITIONS, {"from_state": src, "to_state": dst})
        if src == "submitting" and dst == "processing" and age_seconds is not None:
            self._observe(QUEUE_WAIT, {}, age_seconds)
        if dst in ("succeeded", "failed", "cancelled"):
            code = (error_code or "")[:64] if dst == "failed" else ""
            self._inc(JOBS_FINISHED, {"state": dst, "error_code": code, "tenant": self.tenant_label(tenant)})
            if age_seconds is not None:
                self._observe(END_TO_END, {"state": dst}, age_seconds)

    def provider_call(self, operation: str, outcome: str) -> None:
        self._inc(PROVIDER_REQUESTS, {"operation": operation, "outcome": outcome})

    def inference(self, seconds: float) -> None:
        self._observe(INFERENCE, {}, seconds)

    def callback_delivery(self, outcome: str, count: int = 1) -> None:
        if count:
            self._inc(CALLBACK_DELIVERIES, {"outcome": outcome}, count)

    # --- the mechanics ----------------------------------------------------------------------

    def _add(self, key: str, value: float) -> None:
        self._pending[key] = self._pending.get(key, 0.0) + value

    def _inc(self, metric: MetricDef, labels: dict[str, str], by: float = 1.0) -> None:
        with self._lock:
            self._add(field(metric.name, labels), by)

    def _observe(self, metric: MetricDef, labels: dict[str, str], value: float) -> None:
        value = max(0.0, value)
        bound = next((b for b in metric.buckets if value <= b), float("inf"))
        with self._lock:
            # Per-bucket (not cumulative) counts: the collector accumulates them at scrape time.
            self._add(field(metric.name + "_bucket", {**labels, "le": _le(bound)}), 1.0)
            self._add(field(metric.name + "_sum", labels), value)
            self._add(field(metric.name + "_count", labels), 1.0)

    def take(self) -> dict[str, float]:
        """The deltas since the last take, and forget them."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def give_back(self, deltas: dict[str, float]) -> None:
        """Deltas a flush could not write: kept for the next one."""
        with self._lock:
            for key, value in deltas.items():
                self._add(key, value)


class RedisTotals:
    """The fleet's totals in one Redis hash: `add` (one pipeline of HINCRBYFLOAT) and `read` (HGETALL)."""

    def __init__(self, client: redis.Redis, *, namespace: str = DEFAULT_NAMESPACE):
        self.r = client
        self.key = RedisKeys(namespace).metrics

    def add(self, deltas: dict[str, float]) -> None:
        if not deltas:
            return
        pipe = self.r.pipeline(transaction=False)
        for key, value in deltas.items():
            pipe.hincrbyfloat(self.key, key, value)
        pipe.execute()

    def read(self) -> dict[str, float]:
        raw = self.r.hgetall(self.key)
        out: dict[str, float] = {}
        for k, v in raw.items():
            try:
                out[k.decode() if isinstance(k, bytes) else str(k)] = float(v)
            except ValueError:
                continue
        return out


class MemoryTotals:
    """The same in one process (tests, single-process tools)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, float] = {}

    def add(self, deltas: dict[str, float]) -> None:
        with self._lock:
            for key, value in deltas.items():
                self.totals[key] = self.totals.get(key, 0.0) + value

    def read(self) -> dict[str, float]:
        with self._lock:
            return dict(self.totals)


def flush(recorder: Recorder, totals: RedisTotals | MemoryTotals) -> int:
    """Move the recorder's deltas into `totals`; on a Redis error they stay for the next flush.
    Returns how many fields were written."""
    deltas = recorder.take()
    try:
        totals.add(deltas)
    except redis.RedisError as exc:
        recorder.give_back(deltas)
        log.warning("metrics: flush to Redis failed (%s); kept for the next one", type(exc).__name__)
        return 0
    return len(deltas)


class Flusher:
    """A daemon thread that runs `tick` (flush, heartbeat) every `interval` seconds; `stop()` runs
    it once more (at shutdown) and ends the thread."""

    def __init__(self, tick: Callable[[], None], interval: float):
        self.tick = tick
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-flusher", daemon=True)

    def start(self) -> Flusher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._safe_tick()

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception as exc:  # never let telemetry take a worker down
            log.warning("metrics: tick failed (%s)", type(exc).__name__)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._safe_tick()
