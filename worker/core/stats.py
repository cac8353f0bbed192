"""What the operator console charts and its health page read from SQL: throughput, latency
percentiles, error codes and paid work per tenant over a window, the outbox backlog and the oldest
queued job. Every query is bounded by the window on an indexed column (finished_at, created_at).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.orm import Session, sessionmaker

from models import Job, Outbox
from worker.core.jobs import as_utc
from worker.core.states import State

# Latency percentiles are computed here from at most this many of the window's newest finished
# jobs (SQLite has no percentile aggregate); the chart says when it is a sample.
LATENCY_SAMPLE = 20_000


class Window(str, Enum):
    HOUR = "1h"
    DAY = "24h"
    WEEK = "7d"

    @property
    def seconds(self) -> int:
        return {"1h": 3600, "24h": 86400, "7d": 7 * 86400}[self.value]

    @property
    def buckets(self) -> int:
        return {"1h": 12, "24h": 24, "7d": 28}[self.value]  # 5 min, 1 h, 6 h

    @property
    def bucket_seconds(self) -> int:
        return self.seconds // self.buckets


@dataclass
class Charts:
    window: Window
    start: datetime
    end: datetime
    # per terminal state, jobs finished in each bucket (oldest bucket first)
    throughput: dict[str, list[int]] = field(default_factory=dict)
    # per bucket: p50, p90, p99 seconds (None: no job finished in it)
    queue_wait: list[tuple[float, float, float] | None] = field(default_factory=list)
    end_to_end: list[tuple[float, float, float] | None] = field(default_factory=list)
    latency_sampled: bool = False
    error_codes: list[tuple[str, int]] = field(default_factory=list)
    # tenant -> (jobs created, paid submissions, cost)
    paid: list[tuple[str, int, int, float]] = field(default_factory=list)


def _epoch(column, dialect: str):
    if dialect == "postgresql":
        return func.extract("epoch", column)
    return cast(func.strftime("%s", column), Integer)  # SQLite keeps naive UTC text


def _bucket(column, dialect: str, start: datetime, width: int):
    offset = _epoch(column, dialect) - start.timestamp()
    if dialect == "postgresql":
        return cast(func.floor(offset / width), Integer)
    return cast(offset / width, Integer)  # non-negative (the window's rows only): truncation is floor


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` (non-empty), by linear interpolation between ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def charts(
    sessions: sessionmaker[Session], window: Window, now: datetime, *, tenant: str | None = None, cost_per_submission: float = 0.0
) -> Charts:
    """Everything the console's charts show for `window` ending `now` (one tenant's, or all for None)."""
    start = now - timedelta(seconds=window.seconds)
    width = window.bucket_seconds
    out = Charts(window=window, start=start, end=now)
    scope = [Job.tenant == tenant] if tenant is not None else []
    with sessions() as session:
        dialect = session.get_bind().dialect.name
        finished = [Job.finished_at >= start, Job.finished_at <= now, *scope]
        bucket = _bucket(Job.finished_at, dialect, start, width).label("bucket")
        out.throughput = {s.value: [0] * window.buckets for s in (State.SUCCEEDED, State.FAILED, State.CANCELLED)}
        for state, index, count in session.execute(select(Job.state, bucket, func.count()).where(*finished).group_by(Job.state, bucket)):
            if state in out.throughput and index is not None and 0 <= int(index) <= window.buckets:
                out.throughput[state][min(int(index), window.buckets - 1)] += count  # `now` itself: the last bucket
        rows = session.execute(
            select(Job.created_at, Job.submitted_at, Job.finished_at)
            .where(Job.state == State.SUCCEEDED.value, *finished)
            .order_by(Job.finished_at.desc())
            .limit(LATENCY_SAMPLE + 1)
        ).all()
        out.latency_sampled = len(rows) > LATENCY_SAMPLE
        waits: dict[int, list[float]] = defaultdict(list)
        totals: dict[int, list[float]] = defaultdict(list)
        for created, submitted, done in rows[:LATENCY_SAMPLE]:
            if done is None:
                continue
            index = min(int((as_utc(done) - start).total_seconds() // width), window.buckets - 1)
            if index < 0:
                continue
            totals[index].append((as_utc(done) - as_utc(created)).total_seconds())
            if submitted is not None:
                waits[index].append(max(0.0, (as_utc(submitted) - as_utc(created)).total_seconds()))
        out.queue_wait = [_quantiles(waits.get(i)) for i in range(window.buckets)]
        out.end_to_end = [_quantiles(totals.get(i)) for i in range(window.buckets)]
        codes = session.execute(
            select(Job.error_code, func.count())
            .where(Job.state == State.FAILED.value, *finished)
            .group_by(Job.error_code)
            .order_by(func.count().desc())
            .limit(20)
        )
        out.error_codes = [(code or "(none)", n) for code, n in codes]
        paid = session.execute(
            select(Job.tenant, func.count(), func.coalesce(func.sum(Job.paid_submissions), 0))
            .where(Job.created_at >= start, Job.created_at <= now, *scope)
            .group_by(Job.tenant)
            .order_by(Job.tenant)
        )
        out.paid = [(name, n, int(submissions), round(int(submissions) * cost_per_submission, 6)) for name, n, submissions in paid]
    return out


def _quantiles(values: list[float] | None) -> tuple[float, float, float] | None:
    if not values:
        return None
    return percentile(values, 0.5), percentile(values, 0.9), percentile(values, 0.99)


@dataclass(frozen=True)
class Backlog:
    outbox_unsent: int
    outbox_oldest: datetime | None
    queued: int
    oldest_queued: datetime | None
    in_flight: dict[str, int]
    parked: int  # ambiguous submits waiting for an operator


def backlog(sessions: sessionmaker[Session], *, tenant: str | None = None, parked_code: str = "") -> Backlog:
    """The health page's queue figures: unsent outbox rows (all tenants: the relay is shared),
    queued jobs and the oldest, jobs at each in-flight step, parked ambiguous submits."""
    scope = [Job.tenant == tenant] if tenant is not None else []
    with sessions() as session:
        unsent, oldest_row = session.execute(select(func.count(), func.min(Outbox.created_at)).where(Outbox.sent_at.is_(None))).one()
        queued, oldest_job = session.execute(
            select(func.count(), func.min(Job.created_at)).where(Job.state == State.QUEUED.value, *scope)
        ).one()
        states = [State.SUBMITTING.value, State.PROCESSING.value, State.UPLOADING.value]
        in_flight = Counter({s: 0 for s in states})
        for state, n in session.execute(select(Job.state, func.count()).where(Job.state.in_(states), *scope).group_by(Job.state)):
            in_flight[state] = n
        parked = session.scalar(
            select(func.count()).where(
                Job.state == State.SUBMITTING.value, Job.prediction_id.is_(None), Job.error_code == parked_code, *scope
            )
        )
    return Backlog(
        outbox_unsent=int(unsent or 0),
        outbox_oldest=as_utc(oldest_row) if oldest_row is not None else None,
        queued=int(queued or 0),
        oldest_queued=as_utc(oldest_job) if oldest_job is not None else None,
        in_flight=dict(in_flight),
        parked=int(parked or 0),
    )
