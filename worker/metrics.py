"""Prometheus metrics: a per-app registry served on the API's `/metrics`.

- What the worker processes count (jobs created and finished, queue wait, inference and end-to-end
  histograms, provider requests, callback deliveries, transitions): summed in each process and
  flushed to one Redis hash (adapters/telemetry.py explains why and how); `TotalsCollector` reads
  the hash with one HGETALL per scrape.
- Gauges read at scrape time, cheaply: job counts by state and the outbox backlog (SQL, at most
  once per `cache_seconds`), and from Redis the breaker, the limiter's slots and room, and the
  workers alive (heartbeats within 3 flush intervals).

`python -m worker.metrics` prints the reference of every metric (docs/metrics.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker.adapters.breaker import Breaker, RedisBreaker
from worker.adapters.fleet import Fleet, RedisFleet
from worker.adapters.limiter import Limiter, RedisLimiter
from worker.adapters.redis_client import connect
from worker.adapters.telemetry import CATALOG, MemoryTotals, MetricDef, RedisTotals, parse_field
from worker.config import Settings
from worker.core.jobs import count_by_state, count_outbox_backlog
from worker.core.states import State
from worker.core.tenants import paid_submissions_today

log = logging.getLogger(__name__)

JOBS = "edit_worker_jobs"
DATABASE_UP = "edit_worker_database_up"
PAID_TODAY = "edit_worker_tenant_paid_submissions_today"
COST_TODAY = "edit_worker_tenant_cost_today"
OUTBOX_BACKLOG = "edit_worker_outbox_backlog"
WORKERS_ALIVE = "edit_worker_workers_alive"
BREAKER_OPEN = "edit_worker_breaker_open"
SLOTS_IN_USE = "edit_worker_limiter_slots_in_use"
SLOTS_MAX = "edit_worker_limiter_slots_max"
LIMITER_ROOM = "edit_worker_limiter_room"
RATE_PER_MINUTE = "edit_worker_limiter_rate_per_minute"
TOTALS_UP = "edit_worker_metrics_redis_up"

# The gauges the API computes at scrape time (the flushed counters and histograms are CATALOG).
API_GAUGES: tuple[MetricDef, ...] = (
    MetricDef(JOBS, "gauge", "Jobs in the database by state.", ("state",), source="api"),
    MetricDef(DATABASE_UP, "gauge", "1 if the last scrape could read job counts from the database.", source="api"),
    MetricDef(PAID_TODAY, "gauge", "Provider submissions paid today (UTC) by tenant.", ("tenant",), source="api"),
    MetricDef(
        COST_TODAY,
        "gauge",
        "What today's paid submissions cost (EDIT_WORKER_COST_PER_SUBMISSION each) by tenant.",
        ("tenant",),
        source="api",
    ),
    MetricDef(OUTBOX_BACKLOG, "gauge", "Outbox rows not yet relayed to the broker.", source="api"),
    MetricDef(WORKERS_ALIVE, "gauge", "Worker processes whose heartbeat is at most 3 EDIT_WORKER_METRICS_FLUSH_SECONDS old.", source="api"),
    MetricDef(BREAKER_OPEN, "gauge", "1 while the provider circuit breaker is open.", source="api"),
    MetricDef(SLOTS_IN_USE, "gauge", "Provider concurrency slots held now, fleet-wide.", source="api"),
    MetricDef(SLOTS_MAX, "gauge", "EDIT_WORKER_MAX_CONCURRENCY: the provider concurrency slots there are.", source="api"),
    MetricDef(LIMITER_ROOM, "gauge", "Submissions the limiter would let go now (0 while the rate or the slots are used up).", source="api"),
    MetricDef(RATE_PER_MINUTE, "gauge", "The configured provider submissions per minute.", source="api"),
    MetricDef(TOTALS_UP, "gauge", "1 if the last scrape could read the fleet's counters and gauges from Redis.", source="api"),
)
ALL_METRICS: tuple[MetricDef, ...] = (*CATALOG, *API_GAUGES)


class JobStateCollector(Collector):
    """`edit_worker_jobs{state=…}` from one GROUP BY at most every `cache_seconds`: scrapes in
    between (or at once, from several scrapers) share the last counts, so scraping faster cannot
    load the database. No background thread, and every state is present (zeros included) so
    dashboards never see gaps."""

    def __init__(self, sessions: sessionmaker[Session], *, cache_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.sessions = sessions
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, int] | None] | None = None  # (when, counts; None: database down)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(JOBS, "Jobs in the database by state.", labels=["state"]),
            GaugeMetricFamily(DATABASE_UP, "1 if the last scrape could read job counts from the database."),
        )

    def describe(self) -> Iterable[Metric]:
        # Defined so that registering the collector does not query the database.
        return self._families()

    def _counts(self) -> dict[str, int] | None:
        # One query at a time: concurrent scrapes wait for it and share its answer.
        with self._lock:
            now = self.clock()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            try:
                counts: dict[str, int] | None = count_by_state(self.sessions)
            except SQLAlchemyError as exc:
                # A scrape must not fail because the database is down: report that instead.
                log.warning("metrics: cannot count jobs (%s)", type(exc).__name__)
                counts = None
            self._cached = (now, counts)
            return counts

    def collect(self) -> Iterable[Metric]:
        jobs, up = self._families()
        counts = self._counts()
        if counts is None:
            up.add_metric([], 0)
            return [up]
        for state in State:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        up.add_metric([], 1)
        return [jobs, up]


class TenantSpendCollector(Collector):
    """`edit_worker_tenant_paid_submissions_today{tenant}` and `edit_worker_tenant_cost_today{tenant}`
    from one GROUP BY at most every `cache_seconds` (tenants come from `edit-worker keys`, so the
    label's values are bounded by configuration)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        cost_per_submission: float,
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.sessions = sessions
        self.cost = cost_per_submission
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, int] | None] | None = None

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(PAID_TODAY, "Provider submissions paid today (UTC) by tenant.", labels=["tenant"]),
            GaugeMetricFamily(
                COST_TODAY, "What today's paid submissions cost (EDIT_WORKER_COST_PER_SUBMISSION each) by tenant.", labels=["tenant"]
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _paid(self) -> dict[str, int] | None:
        with self._lock:
            now = self.clock()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            try:
                paid: dict[str, int] | None = paid_submissions_today(self.sessions)
            except SQLAlchemyError as exc:
                log.warning("metrics: cannot count paid submissions (%s)", type(exc).__name__)
                paid = None
            self._cached = (now, paid)
            return paid

    def collect(self) -> Iterable[Metric]:
        paid_family, cost_family = self._families()
        paid = self._paid()
        if paid is None:
            return []
        for tenant, count in sorted(paid.items()):
            paid_family.add_metric([tenant], count)
            cost_family.add_metric([tenant], round(count * self.cost, 6))
        return [paid_family, cost_family]


class TotalsCollector(Collector):
    """The workers' flushed counters and histograms (one HGETALL per scrape) and the Redis gauges
    (breaker, limiter, heartbeats). Every family of the catalog is present, zeros included; a
    Redis that is down gives `edit_worker_metrics_redis_up 0` and nothing else from here."""

    def __init__(
        self,
        totals: RedisTotals | MemoryTotals,
        *,
        fleet: Fleet | None = None,
        breaker: Breaker | None = None,
        limiter: Limiter | None = None,
        max_concurrency: int = 0,
        rate_per_minute: int = 0,
        alive_within: float = 15.0,
    ):
        self.totals = totals
        self.fleet, self.breaker, self.limiter = fleet, breaker, limiter
        self.max_concurrency, self.rate_per_minute = max_concurrency, rate_per_minute
        self.alive_within = alive_within

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not read Redis

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(TOTALS_UP, _help(TOTALS_UP))
        try:
            families = counted_families(self.totals.read())
            families += self._gauges()
        except redis.RedisError as exc:
            log.warning("metrics: cannot read Redis (%s)", type(exc).__name__)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [*families, up]

    def _gauges(self) -> list[Metric]:
        out: list[Metric] = []

        def gauge(name: str, value: float) -> None:
            family = GaugeMetricFamily(name, _help(name))
            family.add_metric([], value)
            out.append(family)

        if self.fleet is not None:
            gauge(WORKERS_ALIVE, len(self.fleet.workers_seen(self.alive_within)))
        if self.breaker is not None:
            gauge(BREAKER_OPEN, 1 if self.breaker.state().get("open") else 0)
        if self.limiter is not None:
            gauge(SLOTS_IN_USE, self.limiter.slots_held())
            gauge(SLOTS_MAX, self.max_concurrency)
            room = self.limiter.capacity()
            gauge(LIMITER_ROOM, room if isinstance(room, int) else 0)
            gauge(RATE_PER_MINUTE, self.rate_per_minute)
        return out


def fleet_collector(settings: Settings) -> TotalsCollector:
    """The production TotalsCollector: the totals, heartbeats, breaker and limiter in the Redis of
    EDIT_WORKER_LIMITER_REDIS_URL (connected on the first scrape)."""
    try:
        client = connect(settings.limiter_redis_url)
    except ValueError:  # not a Redis URL (a memory-only setup): nothing flushed to read
        log.warning("metrics: the Redis URL is not usable; /metrics shows no fleet counters")
        return TotalsCollector(MemoryTotals())
    return TotalsCollector(
        RedisTotals(client),
        fleet=RedisFleet(client),
        breaker=RedisBreaker(client),
        limiter=RedisLimiter(client, rate_per_minute=settings.rate_limit_per_minute, max_concurrency=settings.max_concurrency),
        max_concurrency=settings.max_concurrency,
        rate_per_minute=settings.rate_limit_per_minute,
        alive_within=3 * settings.metrics_flush_seconds,
    )


def _help(name: str) -> str:
    return next(m.help for m in ALL_METRICS if m.name == name)


def counted_families(totals: dict[str, float]) -> list[Metric]:
    """The catalog's counters and histograms from the flushed totals (per-bucket counts made
    cumulative); every family present, a histogram without labels with zeros."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for raw, value in totals.items():
        parsed = parse_field(raw)
        if parsed is not None:
            samples.setdefault(parsed[0], []).append((parsed[1], value))
    families: list[Metric] = []
    for metric in CATALOG:
        if metric.kind == "counter":
            counter = CounterMetricFamily(metric.name, metric.help, labels=list(metric.labels))
            for labels, value in sorted(samples.get(metric.name, []), key=lambda lv: sorted(lv[0].items())):
                counter.add_metric([labels.get(k, "") for k in metric.labels], value)
            families.append(counter)
        else:
            families.append(_histogram(metric, samples))
    return families


def _histogram(metric: MetricDef, samples: dict[str, list[tuple[dict[str, str], float]]]) -> Metric:
    family = HistogramMetricFamily(metric.name, metric.help, labels=list(metric.labels))
    key = lambda labels: tuple(labels.get(k, "") for k in metric.labels)  # noqa: E731
    per: dict[tuple[str, ...], dict[str, float]] = {}
    for labels, value in samples.get(metric.name + "_bucket", []):
        per.setdefault(key(labels), {})[labels.get("le", "+Inf")] = value
    sums = {key(labels): value for labels, value in samples.get(metric.name + "_sum", [])}
    counts = {key(labels): value for labels, value in samples.get(metric.name + "_count", [])}
    label_sets = set(per) | set(sums) | set(counts)
    if not metric.labels:
        label_sets.add(())
    bounds = [repr(float(b)) for b in metric.buckets] + ["+Inf"]
    for values in sorted(label_sets):
        buckets, running = [], 0.0
        for bound in bounds:
            running += per.get(values, {}).get(bound, 0.0)
            buckets.append((bound, running))
        family.add_metric(list(values), buckets, sums.get(values, 0.0))
    return family


class OutboxCollector(Collector):
    """`edit_worker_outbox_backlog`: unsent outbox rows (an indexed count), at most every `cache_seconds`."""

    def __init__(self, sessions: sessionmaker[Session], *, cache_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.sessions, self.cache_seconds, self.clock = sessions, cache_seconds, clock
        self._lock = threading.Lock()
        self._cached: tuple[float, int | None] | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = self.clock()
            if self._cached is None or now - self._cached[0] >= self.cache_seconds:
                try:
                    backlog: int | None = count_outbox_backlog(self.sessions)
                except SQLAlchemyError as exc:
                    log.warning("metrics: cannot count the outbox (%s)", type(exc).__name__)
                    backlog = None
                self._cached = (now, backlog)
            value = self._cached[1]
        if value is None:
            return []
        family = GaugeMetricFamily(OUTBOX_BACKLOG, _help(OUTBOX_BACKLOG))
        family.add_metric([], value)
        return [family]


class Metrics:
    """One registry per app, so tests (and several apps in one process) never collide on names."""

    def __init__(
        self,
        sessions: sessionmaker[Session] | None = None,
        registry: CollectorRegistry | None = None,
        *,
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        cost_per_submission: float = 0.0,
        totals: TotalsCollector | None = None,
    ):
        self.registry = registry or CollectorRegistry()
        if sessions is not None:
            self.registry.register(JobStateCollector(sessions, cache_seconds=cache_seconds, clock=clock))
            self.registry.register(
                TenantSpendCollector(sessions, cost_per_submission=cost_per_submission, cache_seconds=cache_seconds, clock=clock)
            )
            self.registry.register(OutboxCollector(sessions, cache_seconds=cache_seconds, clock=clock))
        if totals is not None:
            self.registry.register(totals)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def reference() -> str:
    """docs/metrics.md: every metric's name, type, labels and help, from the code."""
    lines = [
        "# Metrics reference",
        "",
        "Generated by `python -m worker.metrics > docs/metrics.md` from `worker/adapters/telemetry.py` (CATALOG)",
        "and `worker/metrics.py` (API_GAUGES); `tests/unit/test_metrics.py` fails while this file is stale.",
        "",
        "Served by `edit-worker api` on `GET /metrics` (admin key). Counters and histograms are counted in",
        "the worker processes and flushed to Redis every `EDIT_WORKER_METRICS_FLUSH_SECONDS` (HINCRBYFLOAT,",
        "one pipeline); the API reads them with one HGETALL per scrape. Gauges are read at scrape time",
        "(Redis, or SQL cached for `EDIT_WORKER_METRICS_CACHE_SECONDS`). Times are in seconds. Labels are",
        "bounded: `tenant` is the tenant's name only for tenants listed in `EDIT_WORKER_METRICS_TENANTS`,",
        "else `other`; no metric carries a job id.",
        "",
        "| name | type | labels | help |",
        "| --- | --- | --- | --- |",
    ]
    for m in ALL_METRICS:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        lines.append(f"| `{m.name}` | {m.kind} | {labels} | {m.help} |")
    lines += ["", "Histogram buckets (seconds, upper bounds; `+Inf` too):", ""]
    for m in CATALOG:
        if m.kind == "histogram":
            lines.append(f"- `{m.name}`: {', '.join(f'{b:g}' for b in m.buckets)}")
    return "\n".join(lines) + "\n"


def exported_names() -> set[str]:
    """Every series name a scrape can show (histograms with their _bucket/_sum/_count)."""
    names: set[str] = set()
    for m in ALL_METRICS:
        names.add(m.name)
        if m.kind == "histogram":
            names |= {m.name + "_bucket", m.name + "_sum", m.name + "_count"}
    return names


if __name__ == "__main__":
    print(reference(), end="")
