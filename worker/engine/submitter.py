"""The batch submitter (submit_mode=batch): one pass leases due queued jobs, takes their limiter
slots in one Redis call and submits them concurrently over the process's one HTTP client.

Leasing keeps a job `queued` (it bumps the row's poll_seq, our claim version while queued, and
pushes next_attempt_at out by the lease), so a submitter that dies before sending a job leaves it
queued and due again after the lease — not ambiguous. Each job moves queued -> submitting (CAS on
that version) in its own thread right before its provider call, and from there on it is exactly
`submit.send_submit`, the same code as task mode: the same journal, the same answers to every
error. At most `submit_threads` submits are in the air at once per process (default one), which
is also how many submits a SIGKILL of the process can leave ambiguous.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import Enum

from sqlalchemy import bindparam, case, func, select, update

from worker.adapters.breaker import Gate
from worker.adapters.wavespeed import EditRequest
from worker.core.codes import ErrorCode
from worker.core.jobs import JOBS, as_utc, transition_now
from worker.core.states import State
from worker.core.steps import Next, Step
from worker.engine.bookkeeping import release_slots
from worker.engine.deps import Deps
from worker.engine.fairshare import due_filter, fair_candidates
from worker.engine.pools import shared_pool
from worker.engine.submit import Ticket, input_image, input_retry_delay, send_submit, settle_breaker
from worker.engine.wakeups import wake_poller
from worker.errors import StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """A queued job leased by one submitter pass: still `queued`, due again after the lease unless
    the pass starts its submit first (a CAS on `seq`, the row's claim version)."""

    job_id: str
    seq: int  # the row's poll_seq after leasing: the CAS that starts the submit checks it
    attempts: int
    request: EditRequest  # its `image` is filled in (from S3) right before the submit
    image_uri: str | None = None
    image_sha256: str | None = None
    image_payload: str | None = None  # rows from before revision 0003 only
    tenant: str | None = None
    trace_parent: str | None = None  # the job's trace: its submit span joins it


class Start(str, Enum):
    """How a leased job's submit began."""

    HELD = "held"  # not sent: an earlier submit of the batch opened the breaker; back to queued
    LOST = "lost"  # someone else moved the job between lease and submit
    STARTED = "started"  # moved to submitting and sent (whatever the provider answered)
    ACCEPTED = "accepted"  # ... and the provider created a task
    DEFERRED = "deferred"  # not sent: its input image could not be read; back to queued with a backoff

    def __str__(self) -> str:
        return self.value


@dataclass
class SubmitBatchReport:
    leased: int = 0
    started: int = 0  # moved to submitting and sent (whatever the provider answered)
    accepted: int = 0  # the provider created a task
    deferred: int = 0  # leased, but the limiter had no slot: back to queued for `wait`
    lost: int = 0  # someone else moved the job between lease and submit
    backpressure: bool = False  # stopped because the pollers are behind
    next_due_in: float | None = None  # when queued work is due next (None: nothing queued)
    schedule: list[Next] = field(default_factory=list)  # follow-up messages to publish


# How many fair-ordered candidates a lease looks at per job it takes.
CANDIDATES_PER_LEASE = 4


def lease_queued(deps: Deps, limit: int) -> list[Lease]:
    """Lease up to `limit` due queued jobs in fair-share order (fairshare.py: tenants take turns,
    priority within a tenant, in-flight caps). PostgreSQL: FOR UPDATE SKIP LOCKED, so concurrent
    submitters lease disjoint sets; SQLite serialises writers and the UPDATE re-checks."""
    now = deps.clock()
    c = JOBS.c
    # More candidates than the lease takes: concurrent submitters see the same fair order, and each
    # takes the first `limit` of it that nobody else has locked (SKIP LOCKED), in that order.
    wanted = fair_candidates(deps, limit * CANDIDATES_PER_LEASE)
    if not wanted:
        return []
    fair_order = case({job_id: i for i, job_id in enumerate(wanted)}, value=c.id)
    # A materialized CTE: PostgreSQL may re-run an `IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`
    # subquery during the UPDATE, each run skipping what the last one locked — more than n rows.
    due = (
        select(c.id)
        .where(c.id.in_(wanted), *due_filter(now))
        .order_by(fair_order)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    stmt = (
        update(JOBS)
        .where(c.id.in_(select(due.c.id)), *due_filter(now))
        .values(poll_seq=c.poll_seq + 1, next_attempt_at=now + timedelta(seconds=deps.settings.submit_lease_seconds), updated_at=now)
        .returning(
            c.id,
            c.poll_seq,
            c.attempts,
            c.prompt,
            c.image_uri,
            c.image_sha256,
            c.image_payload,
            c.size,
            c.seed,
            c.enable_base64_output,
            c.created_at,
            c.tenant,
            c.trace_parent,
        )
    )
    with deps.sessions() as session:
        rows = list(session.execute(stmt).all())
        session.commit()
    order = {job_id: i for i, job_id in enumerate(wanted)}
    rows.sort(key=lambda r: order[r.id])
    return [
        Lease(
            r.id,
            r.poll_seq,
            r.attempts,
            EditRequest(prompt=r.prompt, image="", size=r.size, seed=r.seed, enable_base64_output=r.enable_base64_output),
            r.image_uri,
            r.image_sha256,
            r.image_payload,
            r.tenant,
            r.trace_parent,
        )
        for r in rows
    ]


def _context(lease: Lease) -> dict:
    return {"job_id": lease.job_id, "tenant": lease.tenant, "attempt": lease.attempts, "trace_parent": lease.trace_parent}


def _unlease(deps: Deps, leases: list[Lease], wait: float) -> None:
    """Hand leased jobs back (no limiter slot now): due again in `wait`, no attempt spent."""
    if not leases:
        return
    c = JOBS.c
    due = deps.clock() + timedelta(seconds=wait)
    stmt = (
        update(JOBS)
        .where(c.id == bindparam("b_id"), c.state == State.QUEUED.value, c.poll_seq == bindparam("b_seq"))
        .values(next_attempt_at=due, updated_at=deps.clock())
    )
    with deps.sessions() as session:
        session.connection().execute(stmt, [{"b_id": lease.job_id, "b_seq": lease.seq} for lease in leases])
        session.commit()


def _defer_unreadable(deps: Deps, lease: Lease, why: str) -> None:
    """A leased job whose input S3 could not serve: its limiter slot back, due again after a
    backoff, still queued (the lease's claim version guards the update)."""
    deps.limiter.release(lease.job_id)
    c = JOBS.c
    now = deps.clock()
    stmt = (
        update(JOBS)
        .where(c.id == lease.job_id, c.state == State.QUEUED.value, c.poll_seq == lease.seq)
        .values(
            next_attempt_at=now + timedelta(seconds=input_retry_delay(deps)),
            updated_at=now,
            error_code=ErrorCode.INPUT_UNAVAILABLE.value,
            error_message=why[:2000],
        )
    )
    try:
        with deps.sessions() as session:
            session.execute(stmt)
            session.commit()
    except Exception as exc:  # database down too: the lease runs out and the job is due again
        log.warning("could not defer a leased submit: %s", type(exc).__name__, extra=_context(lease))


# How long one submit takes here (CAS, provider call, record), an in-process running average:
# it sizes the batches so that a pass leases only what it can send within its time.
_submit_seconds = 0.05


def _batch_that_fits(threads: int, seconds: float) -> int:
    return max(threads, int(threads * seconds / max(_submit_seconds, 0.001)))


class _Batch:
    """What the submits of one batch tell each other: once one of them met a provider error, the
    rest look at the shared breaker before sending (one Redis call each, only then)."""

    def __init__(self) -> None:
        self.trouble = threading.Event()
        self.inputs_down = threading.Event()  # S3 could not serve an input: the rest wait too


def start_leased(deps: Deps, lease: Lease, probe: bool = False, batch: _Batch | None = None) -> tuple[Start, Next | None]:
    """Submit one leased job: queued -> submitting (a CAS on the lease's version), then the provider
    call. Returns (outcome, what to schedule next); outcome is "accepted" (the provider created a
    task), "started" (sent, whatever the answer), "held" (an earlier submit of `batch` opened the
    breaker) or "lost" (the lease is stale: someone else moved or re-leased the job, nothing sent).
    `probe`: this submit is the half-open breaker's one probe. `submit_due` runs it in pool threads."""
    global _submit_seconds
    began = time.monotonic()
    batch = batch or _Batch()
    try:
        status, nxt = _start_one(deps, lease, probe, batch)
        if nxt is not None and nxt.step == Step.SUBMIT:
            batch.trouble.set()  # a transient error or refused credentials: the breaker may be open
        return status, nxt
    finally:
        _submit_seconds = 0.8 * _submit_seconds + 0.2 * (time.monotonic() - began)


def _start_one(deps: Deps, lease: Lease, probe: bool, batch: _Batch) -> tuple[Start, Next | None]:
    """In a pool thread: queued -> submitting (CAS on the lease), then the provider call."""
    if not probe and batch.trouble.is_set() and _breaker_opened(deps):
        return Start.HELD, None  # an earlier submit of this batch opened the breaker
    if batch.inputs_down.is_set():
        _defer_unreadable(deps, lease, "S3 could not serve another input of this batch")
        return Start.DEFERRED, None
    try:
        # Before queued -> submitting: a job whose image cannot be read stays queued (no attempt
        # spent) and is never sent without it.
        lease = replace(
            lease, request=replace(lease.request, image=input_image(deps, lease.image_uri, lease.image_sha256, lease.image_payload))
        )
    except StorageError as exc:
        batch.inputs_down.set()
        _defer_unreadable(deps, lease, str(exc))
        log.warning("input image unreadable, submit retried later: %s", exc, extra=_context(lease))
        return Start.DEFERRED, None
    attempt = lease.attempts + 1
    try:
        moved = transition_now(
            deps.sessions,
            lease.job_id,
            State.QUEUED,
            State.SUBMITTING,
            f"submit attempt {attempt}",
            clock=deps.clock,
            where={"poll_seq": lease.seq},
            attempts=attempt,
            submitted_at=deps.clock(),
            next_attempt_at=None,
        )
    except Exception as exc:  # database down: the job is still queued and its lease runs out
        log.warning("could not start a leased submit: %s", type(exc).__name__, extra=_context(lease))
        deps.limiter.release(lease.job_id)
        return Start.LOST, None
    if moved is None:
        deps.limiter.release(lease.job_id)
        return Start.LOST, None
    try:
        nxt = send_submit(deps, Ticket(lease.job_id, attempt, lease.request, probe, lease.tenant, lease.trace_parent), batch=True)
    except Exception as exc:
        # The job is in `submitting`: whether a task exists is for the reconciler to find out (the
        # journal, then the provider's task list) — never a blind resubmit.
        log.warning("submit ended with %s; the reconciler settles it", type(exc).__name__, extra=_context(lease))
        return Start.STARTED, None
    accepted = nxt is not None and nxt.step in (Step.POLL_DUE, Step.POLL)
    return (Start.ACCEPTED if accepted else Start.STARTED), nxt


def submit_due(deps: Deps, *, max_seconds: float | None = None, executor=None) -> SubmitBatchReport:
    """One submitter pass: lease, take slots, submit — batch after batch until nothing is due, a
    limit or the breaker says wait, or `max_seconds` pass. Never sleeps."""
    s = deps.settings
    report = SubmitBatchReport()
    pool = executor or shared_pool("submit", s.submit_threads, initializer=_lower_priority)
    started = time.monotonic()
    limit = max_seconds if max_seconds is not None else s.batch_pass_seconds
    waits: list[float] = []
    polls: list[float] = []
    while time.monotonic() - started < limit:
        gate = deps.breaker.check()
        if not gate.go:
            waits.append(gate.wait)
            break
        probe = gate.probe
        if not probe and _pollers_behind(deps):
            report.backpressure = True
            waits.append(BACKPRESSURE_RECHECK)
            break
        room = 1 if probe else deps.limiter.capacity()
        if isinstance(room, Gate):
            waits.append(room.wait)
            break
        # No more than the pass can send before its time is up (and well inside the lease).
        want = min(s.submit_batch_size, room, _batch_that_fits(s.submit_threads, limit))
        if not probe:
            want, pace_wait = deps.limiter.pace(want, pace_rate(deps))
            if want == 0:
                waits.append(pace_wait)
                break
        leases: list[Lease] = []
        try:
            leases = lease_queued(deps, want)
        finally:
            if probe and not leases:
                deps.breaker.release_probe()  # an unused probe goes back at once
        report.leased += len(leases)
        if not leases:
            break
        granted, gate = deps.limiter.acquire_many([lease.job_id for lease in leases])
        go, back = leases[:granted], leases[granted:]
        if back:
            _unlease(deps, back, gate.wait)
            report.deferred += len(back)
            waits.append(gate.wait)
            log.info("%d submit(s) deferred %.1fs: %s", len(back), gate.wait, gate.reason)
        if probe and not go:
            deps.breaker.release_probe()
        batch = _Batch()
        outcomes = list(pool.map(lambda lease: start_leased(deps, lease, probe, batch), go))
        held = [lease for lease, (status, _) in zip(go, outcomes) if status is Start.HELD]
        if held:
            # The breaker opened mid-batch (a 401, or an outage): the rest wait in `queued`, no
            # attempt spent, and are due when the breaker lets submissions through again.
            wait = max(_breaker_opened(deps), BACKPRESSURE_RECHECK)
            release_slots(deps, [lease.job_id for lease in held])
            _unlease(deps, held, wait)
            report.deferred += len(held)
            waits.append(wait)
        for status, nxt in outcomes:
            if status is Start.HELD:
                continue
            if status is Start.DEFERRED:  # its input could not be read: back to queued with a backoff
                report.deferred += 1
                if probe:
                    deps.breaker.release_probe()  # the probe was not used
                continue
            report.lost += status is Start.LOST
            report.started += status is not Start.LOST
            report.accepted += status is Start.ACCEPTED
            if nxt is None:
                continue
            if nxt.step == Step.POLL_DUE:
                polls.append(nxt.countdown)
            elif nxt.step == Step.SUBMIT:
                continue  # a retry later: the row's next_attempt_at says when; a pass takes it then
            else:
                report.schedule.append(nxt)  # task poll mode: each job's own poll chain
        if polls:
            # Wake the poller for this batch now (de-duplicated per half second), not at the end
            # of the pass: the first jobs of a long pass would otherwise be polled late.
            wake_poller(deps, min(polls))
            polls.clear()
        if report.accepted:
            settle_breaker(deps)
        if back or held or len(leases) < want or probe:
            break
    report.next_due_in = _next_due_in(deps, blocked=min(waits) if waits else 0.0)
    if report.leased:
        log.info(
            "submitter pass: %d leased, %d accepted, %d deferred, %d lost in %.2fs%s; next due in %s",
            report.leased,
            report.accepted,
            report.deferred,
            report.lost,
            time.monotonic() - started,
            " (held back: pollers behind)" if report.backpressure else "",
            "-" if report.next_due_in is None else f"{report.next_due_in:.1f}s",
        )
    return report


def _breaker_opened(deps: Deps) -> float:
    """Seconds the shared breaker stays open (0: closed); a Redis error counts as closed, as in
    the per-job path (the provider's own answer is the final word)."""
    try:
        return deps.breaker.wait()
    except Exception:
        return 0.0


# Adaptive pacing: the window in which the fleet's busiest copy-out second is looked for, and
# the headroom over it (the rate grows by it each time the copies catch up with what was
# submitted; while the pollers are behind, backpressure stops submissions instead).
PACE_WINDOW_SECONDS = 60
PACE_HEADROOM = 1.5


def pace_rate(deps: Deps) -> float | None:
    """Submissions per second fleet-wide. None: the limiter's own pace (submit_pace_per_second:
    the manual override when set, else unpaced); with adaptive_pacing and no manual pace, the
    fleet's measured copy-out rate times PACE_HEADROOM, never below adaptive_pace_floor."""
    s = deps.settings
    if s.submit_pace_per_second > 0 or not s.adaptive_pacing:
        return None
    try:
        peak = deps.fleet.peak_copy_rate(PACE_WINDOW_SECONDS)
    except Exception:  # Redis down: the floor is always a safe answer
        peak = 0.0
    # Always the headroom: "pollers behind" (a poll overdue by a second) fires on a busy host
    # without the copies being saturated, and holding the rate then kept it near the floor
    # (2,000 x 10 s drained at 22 jobs/s). Saturated pollers are handled by the backpressure
    # check, which stops submitting altogether while they are behind.
    return max(s.adaptive_pace_floor, peak * PACE_HEADROOM)


# How soon a submitter held back by busy pollers looks again.
BACKPRESSURE_RECHECK = 0.5


def _pollers_behind(deps: Deps) -> bool:
    """Is any job's poll overdue by more than submit_backpressure_seconds? (Claimed jobs are not:
    a claim pushes next_poll_at out by the lease, and backoffs push it out too.)"""
    grace = deps.settings.submit_backpressure_seconds
    if grace <= 0 or deps.settings.poll_mode != "batch":
        return False
    c = JOBS.c
    cutoff = deps.clock() - timedelta(seconds=grace)
    with deps.sessions() as session:
        return session.scalar(select(c.id).where(c.state == State.PROCESSING.value, c.next_poll_at < cutoff).limit(1)) is not None


def _next_due_in(deps: Deps, *, blocked: float) -> float | None:
    """Seconds until queued work can go: the rows' soonest next_attempt_at, but not before the
    limiter or breaker allows (`blocked`). None when nothing is queued."""
    now = deps.clock()
    c = JOBS.c
    with deps.sessions() as session:
        row = session.execute(
            select(func.count(), func.min(c.next_attempt_at), func.count().filter(c.next_attempt_at.is_(None))).where(
                c.state == State.QUEUED.value, c.deadline_at > now
            )
        ).one()
    queued, soonest, undated = row
    if not queued:
        return None
    if undated:
        due = 0.0
    else:
        due = max(0.0, (as_utc(soonest) - now).total_seconds())
    return max(due, blocked)


# Reap before sowing, on the CPU too: submit threads run at a lower scheduling priority (Linux
# lets any thread raise its own nice value), so when a host is CPU-bound the pollers copying out
# finished predictions get the CPU first and submitting slows down to what is left.
SUBMIT_THREAD_NICE = 5


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SUBMIT_THREAD_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: plain priority
        pass
