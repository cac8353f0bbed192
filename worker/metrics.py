"""Prometheus metrics: a per-app registry with job counts by state (read from SQL, at most once
per `cache_seconds`) and the counters the pipeline can increment (provider requests, transitions,
breaker state).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker.core.jobs import count_by_state
from worker.core.states import State
from worker.core.tenants import paid_submissions_today

log = logging.getLogger(__name__)

JOBS = "edit_worker_jobs"
DATABASE_UP = "edit_worker_database_up"
PAID_TODAY = "edit_worker_tenant_paid_submissions_today"
COST_TODAY = "edit_worker_tenant_cost_today"


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
    ):
        self.registry = registry or CollectorRegistry()
        self.provider_requests = Counter(
            "edit_worker_provider_requests_total",
            "Requests to the provider by kind (submit, result, cancel, list, "
            "download) and outcome (ok, transient, permanent, auth, ambiguous).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.transitions = Counter(
            "edit_worker_transitions_total",
            "Job state transitions.",
            ["from_state", "to_state"],
            registry=self.registry,
        )
        self.breaker_open = Gauge(
            "edit_worker_breaker_open",
            "1 while the provider circuit breaker is open.",
            registry=self.registry,
        )
        if sessions is not None:
            self.registry.register(JobStateCollector(sessions, cache_seconds=cache_seconds, clock=clock))
            self.registry.register(
                TenantSpendCollector(sessions, cost_per_submission=cost_per_submission, cache_seconds=cache_seconds, clock=clock)
            )

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
