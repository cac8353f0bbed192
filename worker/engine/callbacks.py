"""Delivering callbacks to producers: a batch pass claims due deliveries (queued by the terminal
transition itself, see core/jobs._move), POSTs each job's JSON signed the Standard Webhooks way
over one pooled client, and records the outcome: delivered on a 2xx, else retried with backoff
until the retry window closes. Plus the operator's redelivery. Nothing here sleeps.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, cast

import httpx
from pydantic import SecretStr
from sqlalchemy import CursorResult, bindparam, func, select, update

from models import CallbackDelivery, Job
from worker.adapters import tracing
from worker.adapters.callback_signing import InvalidSigningSecret, signed_headers
from worker.core import tenants
from worker.core.deliveries import DELIVERIES, DeliveryStatus
from worker.core.jobs import as_utc, get_job, to_json
from worker.core.validation import Resolver, check_url
from worker.engine.deps import Deps
from worker.engine.pools import shared_pool
from worker.engine.wakeups import wake_callbacks
from worker.errors import DeliveryNotFound, InvalidInput, InvalidJobOperation

log = logging.getLogger(__name__)

# What of a receiver's answer is read (then the connection is dropped): its body means nothing to us.
MAX_RESPONSE_BYTES = 4096
USER_AGENT = "edit-worker-callbacks/1"
DEFAULT_TENANT = "default"
PENDING, DELIVERED, FAILED = DeliveryStatus.PENDING.value, DeliveryStatus.DELIVERED.value, DeliveryStatus.FAILED.value


def callback_secret(deps: Deps, tenant: str) -> SecretStr | None:
    """The secret that signs `tenant`'s callbacks: the tenant's own (made by `edit-worker keys
    create`, shown with the key), else EDIT_WORKER_CALLBACK_SECRET (None: neither exists)."""
    own = tenants.webhook_secret(deps.sessions, tenant)
    if own is not None:
        return own
    value = deps.settings.callback_secret
    raw = (value.get_secret_value() if isinstance(value, SecretStr) else (value or "")).strip()
    return SecretStr(raw) if raw else None


def callback_body(deps: Deps, job: Job) -> bytes:
    """What a callback POSTs: the job JSON of the contract (DESIGN §4), compact."""
    s = deps.settings
    links = deps.storage.links(list(job.outputs or []), s.result_link_seconds) if job.outputs else []
    return json.dumps(to_json(job, output_urls=links, cost_per_submission=s.cost_per_submission), separators=(",", ":")).encode()


def retry_delay(failed_tries: int, *, base: float, maximum: float, rng, retry_after: float | None = None) -> float:
    """Seconds before the next try after `failed_tries` failures: base * 2**(failed_tries-1),
    capped at `maximum`, jittered to [half, full] — a fleet's retries spread out, yet a receiver
    that is down is never hammered by near-zero waits. A receiver's Retry-After is a floor (capped
    at `maximum` too: it cannot park a delivery beyond the schedule)."""
    ceiling = min(maximum, base * 2 ** max(0, min(failed_tries - 1, 30)))
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, min(float(retry_after), maximum))
    return delay


# --- the HTTP client ---------------------------------------------------------------------------


def make_client(settings, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The client callbacks go out on: short timeouts, no redirects (a 3xx is a failed try, so a
    receiver cannot bounce us onto another host), a bounded pool."""
    timeout = httpx.Timeout(settings.callback_timeout, connect=min(settings.callback_timeout, 5.0))
    threads = settings.callback_threads
    return httpx.Client(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=threads * 2, max_keepalive_connections=threads),
        headers={"user-agent": USER_AGENT},
    )


_client_lock = threading.Lock()
_client: httpx.Client | None = None


def shared_client(settings) -> httpx.Client:
    """The process's one callback client (created on first use)."""
    global _client
    with _client_lock:
        if _client is None:
            _client = make_client(settings)
        return _client


def reset_client() -> None:
    """Forget the process's client (after a fork: a child must not share its parent's sockets)."""
    global _client
    with _client_lock:
        _client = None


# --- one try -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A delivery claimed for one try; `attempt` is its claim version (every record is a CAS on it)."""

    id: int
    job_id: str
    webhook_id: str
    url: str
    attempt: int
    deadline: datetime  # retries stop here
    body: bytes
    tenant: str
    trace_parent: str | None = None  # the job's trace: the try's span joins it


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    status_code: int | None = None
    error: str | None = None  # short, for the row and the logs: never a URL, a body or a secret
    retry_after: float | None = None
    at: datetime | None = None  # when the answer came (a batch is recorded after its slowest try)


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - now).total_seconds())
    except (TypeError, ValueError):
        return None


def _read_capped(response: httpx.Response, until: float) -> None:
    read = 0
    try:
        for chunk in response.iter_raw():
            read += len(chunk)
            if read >= MAX_RESPONSE_BYTES or time.monotonic() > until:
                return
    except httpx.StreamConsumed:  # a transport that read the body already (a test's MockTransport)
        return


def send(deps: Deps, client: httpx.Client, claim: Claim, resolver: Resolver | None = None) -> Outcome:
    """One signed POST of a claimed delivery (no database work: safe in a thread pool). The URL
    passes the private-address guard now, not only when the job was created: DNS may have changed."""
    try:
        if resolver is None:
            check_url(claim.url, allow_private=deps.settings.allow_private_urls, what="callback URL")
        else:
            check_url(claim.url, allow_private=deps.settings.allow_private_urls, resolver=resolver, what="callback URL")
    except InvalidInput as exc:
        return Outcome(False, error=f"callback URL refused: {exc}"[:200])
    secret = callback_secret(deps, claim.tenant)
    if secret is None:
        return Outcome(False, error="no callback secret configured (EDIT_WORKER_CALLBACK_SECRET)")
    try:
        headers = signed_headers(secret, claim.webhook_id, int(deps.clock().timestamp()), claim.body)
    except InvalidSigningSecret as exc:
        return Outcome(False, error=str(exc))
    headers["content-type"] = "application/json"
    started = time.monotonic()
    try:
        with client.stream("POST", claim.url, content=claim.body, headers=headers) as response:
            # Read a little (so a kept-alive connection can be reused), never the whole of a large
            # or endless answer, and never for longer than the try's timeout.
            _read_capped(response, started + deps.settings.callback_timeout)
    except httpx.TimeoutException:
        return Outcome(False, error="timed out")
    except httpx.HTTPError as exc:
        return Outcome(False, error=f"not reached ({type(exc).__name__})")
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(True, code, at=deps.clock())
    if 300 <= code < 400:
        return Outcome(False, code, f"HTTP {code}: redirects are not followed")
    return Outcome(False, code, f"HTTP {code}", _retry_after(response, deps.clock()) if code in (429, 503) else None)


# --- the batch pass ----------------------------------------------------------------------------


def _lease_seconds(deps: Deps) -> float:
    # A claimed delivery is due again after this long if its sender dies mid-try (another takes it:
    # a duplicate at worst, with the same webhook-id); well past one try's timeout.
    return 2 * deps.settings.callback_timeout + 30.0


def claim_due(deps: Deps, limit: int) -> list[Claim]:
    """Claim up to `limit` pending deliveries that are due: bump `attempts` (the claim version) and
    push next_attempt_at out by the lease. PostgreSQL: FOR UPDATE SKIP LOCKED, so concurrent passes
    claim disjoint sets; SQLite serialises writers, and the UPDATE re-checks the due time. A first
    try also fixes the body it (and every retry) sends: the job as it is now."""
    now = deps.clock()
    d = CallbackDelivery
    due = (
        select(d.id)
        .where(d.status == PENDING, d.next_attempt_at <= now)
        .order_by(d.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    stmt = (
        update(d)
        .where(d.id.in_(select(due.c.id)), d.status == PENDING, d.next_attempt_at <= now)
        .values(attempts=d.attempts + 1, next_attempt_at=now + timedelta(seconds=_lease_seconds(deps)), last_attempt_at=now)
        .returning(d.id, d.job_id, d.webhook_id, d.url, d.attempts, d.give_up_at, d.created_at, d.payload)
        .execution_options(synchronize_session=False)
    )
    window = timedelta(seconds=deps.settings.callback_retry_seconds)
    with deps.sessions() as session:
        rows = session.execute(stmt).all()
        if not rows:
            session.commit()
            return []
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_({row.job_id for row in rows})))}
        bodies: dict[int, bytes] = {}
        fill = []
        for row in rows:
            if row.payload is not None:
                bodies[row.id] = row.payload.encode()
            else:
                bodies[row.id] = callback_body(deps, jobs[row.job_id])
                fill.append({"b_id": row.id, "b_payload": bodies[row.id].decode()})
        if fill:
            table = DELIVERIES
            session.connection().execute(
                update(table).where(table.c.id == bindparam("b_id"), table.c.payload.is_(None)).values(payload=bindparam("b_payload")),
                fill,
            )
        session.commit()
    return [
        Claim(
            id=row.id,
            job_id=row.job_id,
            webhook_id=row.webhook_id,
            url=row.url,
            attempt=row.attempts,
            deadline=row.give_up_at or (row.created_at + window),
            body=bodies[row.id],
            tenant=getattr(jobs[row.job_id], "tenant", None) or DEFAULT_TENANT,
            trace_parent=jobs[row.job_id].trace_parent,
        )
        for row in rows
    ]


@dataclass
class DeliveryReport:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0  # gave up: the retry window closed
    next_due_in: float | None = None
    backlog: bool = False  # stopped with full batches still coming: more is due right now


def record(deps: Deps, outcomes: list[tuple[Claim, Outcome]]) -> DeliveryReport:
    """Write a batch's outcomes in one executemany UPDATE, each a CAS on its claim version (a
    sender whose lease ran out, and whose delivery another claimed meanwhile, writes nothing)."""
    report = DeliveryReport()
    if not outcomes:
        return report
    now = deps.clock()
    s = deps.settings
    params = []
    for claim, outcome in outcomes:
        values: dict[str, Any] = {"b_code": outcome.status_code, "b_error": outcome.error[:200] if outcome.error else None}
        if outcome.delivered:
            values.update(b_status=DELIVERED, b_next=None, b_delivered=outcome.at or now)
            report.delivered += 1
            log.info("callback delivered", extra=_context(claim, status_code=outcome.status_code))
        elif now >= claim.deadline:
            values.update(b_status=FAILED, b_next=None, b_delivered=None)
            report.failed += 1
            log.warning("callback failed for good after %d tries: %s", claim.attempt, outcome.error, extra=_context(claim))
        else:
            wait = retry_delay(
                claim.attempt, base=s.callback_backoff_base, maximum=s.callback_backoff_max, rng=deps.rng, retry_after=outcome.retry_after
            )
            # The last try falls on the deadline itself; if that fails too, the delivery has failed.
            values.update(b_status=PENDING, b_next=min(now + timedelta(seconds=wait), claim.deadline), b_delivered=None)
            report.retried += 1
            log.info("callback try %d failed, next in %.1fs: %s", claim.attempt, wait, outcome.error, extra=_context(claim))
        params.append({"b_id": claim.id, "b_attempt": claim.attempt, **values})
    table = DELIVERIES
    stmt = (
        update(table)
        .where(table.c.id == bindparam("b_id"), table.c.attempts == bindparam("b_attempt"), table.c.status == PENDING)
        .values(
            status=bindparam("b_status"),
            next_attempt_at=bindparam("b_next", type_=table.c.next_attempt_at.type),
            delivered_at=bindparam("b_delivered", type_=table.c.delivered_at.type),
            last_status_code=bindparam("b_code", type_=table.c.last_status_code.type),
            last_error=bindparam("b_error", type_=table.c.last_error.type),
        )
    )
    with deps.sessions() as session:
        session.connection().execute(stmt, params)
        session.commit()
    for label, count in (("delivered", report.delivered), ("retried", report.retried), ("failed", report.failed)):
        deps.metrics.callback_delivery(label, count)
    return report


def _context(claim: Claim, **extra) -> dict:
    return {
        "job_id": claim.job_id,
        "tenant": claim.tenant,
        "delivery_id": claim.id,
        "webhook_id": claim.webhook_id,
        "attempt": claim.attempt,
        "trace_parent": claim.trace_parent,
        **extra,
    }


def deliver_due(
    deps: Deps,
    *,
    max_seconds: float = 10.0,
    client: httpx.Client | None = None,
    resolver: Resolver | None = None,
    executor=None,
) -> DeliveryReport:
    """Claim due deliveries and send them concurrently over one pooled client, batch after batch
    until none is due (or `max_seconds` pass). Never sleeps."""
    s = deps.settings
    client = client or shared_client(s)
    pool = executor or shared_pool("callbacks", s.callback_threads)
    report = DeliveryReport()
    started = time.monotonic()
    while time.monotonic() - started < max_seconds:
        claims = claim_due(deps, s.callback_batch_size)
        report.claimed += len(claims)
        if not claims:
            break
        outcomes = list(pool.map(lambda c: _send_safely(deps, client, c, resolver), claims))
        batch = record(deps, list(zip(claims, outcomes)))
        report.delivered += batch.delivered
        report.retried += batch.retried
        report.failed += batch.failed
        if len(claims) < s.callback_batch_size:
            break
    else:
        report.backlog = True
    report.next_due_in = next_due_in(deps)
    if report.claimed:
        log.info(
            "callback pass: %d claimed, %d delivered, %d to retry, %d failed in %.2fs",
            report.claimed,
            report.delivered,
            report.retried,
            report.failed,
            time.monotonic() - started,
        )
    return report


def _send_safely(deps: Deps, client: httpx.Client, claim: Claim, resolver: Resolver | None) -> Outcome:
    # Each try is a span in its job's trace (the batch is shared, the traces are not).
    with deps.tracing.step(tracing.CALLBACK, claim.trace_parent, job_id=claim.job_id, tenant=claim.tenant, attempt=claim.attempt) as span:
        try:
            outcome = send(deps, client, claim, resolver)
        except Exception as exc:  # a bug or an odd URL must cost one try, not the whole batch
            span.error(exc)
            log.warning("callback try raised %s", type(exc).__name__, extra=_context(claim))
            outcome = Outcome(False, error=f"internal error ({type(exc).__name__})")
        span.set(outcome="delivered" if outcome.delivered else "undelivered", http_status_code=outcome.status_code)
        return outcome


def next_due_in(deps: Deps) -> float | None:
    """Seconds until the soonest pending delivery is due (None: nothing pending)."""
    with deps.sessions() as session:
        soonest = session.scalar(select(func.min(CallbackDelivery.next_attempt_at)).where(CallbackDelivery.status == PENDING))
    if soonest is None:
        return None
    return max(0.0, (as_utc(soonest) - deps.clock()).total_seconds())


# --- the operator's redelivery -----------------------------------------------------------------


def _reopen(deps: Deps, where: list, now: datetime) -> int:
    # Due now, with a fresh retry window; `attempts` keeps counting (it is the claim version).
    values = {"status": PENDING, "next_attempt_at": now, "give_up_at": now + timedelta(seconds=deps.settings.callback_retry_seconds)}
    with deps.sessions() as session:
        moved = session.execute(update(CallbackDelivery).where(*where).values(**values).execution_options(synchronize_session=False))
        session.commit()
    return cast(CursorResult, moved).rowcount or 0


def redeliver(deps: Deps, *, delivery_id: int | None = None, job_id: str | None = None) -> CallbackDelivery:
    """Send one delivery again, now (a delivered one too: a receiver may have lost it), under the
    same webhook-id, with a fresh retry window. By id, or a job's latest delivery."""
    if (delivery_id is None) == (job_id is None):
        raise InvalidInput("name a delivery id or a job id")
    with deps.sessions() as session:
        if job_id is not None:
            get_job(deps.sessions, job_id)  # JobNotFound
            delivery_id = session.scalar(select(func.max(CallbackDelivery.id)).where(CallbackDelivery.job_id == job_id))
            if delivery_id is None:
                raise InvalidJobOperation(f"job {job_id} has no callback deliveries (no callback_url, or not finished yet)")
        elif session.get(CallbackDelivery, delivery_id) is None:
            raise DeliveryNotFound(f"no callback delivery {delivery_id}")
    _reopen(deps, [CallbackDelivery.id == delivery_id], deps.clock())
    wake_callbacks(deps)
    with deps.sessions() as session:
        delivery = session.get(CallbackDelivery, delivery_id)
        assert delivery is not None
        return delivery


def redeliver_failed(deps: Deps, since: datetime | None = None, *, tenant: str | None = None) -> int:
    """Send every failed delivery (created at or after `since`; of one tenant's jobs, or all for
    None) again, now; how many."""
    where = [CallbackDelivery.status == FAILED]
    if since is not None:
        where.append(CallbackDelivery.created_at >= since)
    if tenant is not None:
        where.append(CallbackDelivery.job_id.in_(select(Job.id).where(Job.tenant == tenant)))
    count = _reopen(deps, where, deps.clock())
    wake_callbacks(deps, count > 0)
    return count
