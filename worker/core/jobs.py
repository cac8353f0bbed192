"""The job service: create (validated, idempotent, with its outbox row), compare-and-set
transitions with an audit event each (and, into a terminal state, the job's callback delivery),
and the queries and JSON shape the CLI and API show.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, cast

from sqlalchemy import (
    JSON,
    CursorResult,
    Integer,
    Row,
    String,
    Table,
    Text,
    bindparam,
    column,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker, undefer
from sqlalchemy.sql import ClauseElement

from models import IdempotencyKey, Job, JobEvent, Outbox, Tenant
from worker.core.deliveries import DELIVERIES, QUEUED_FLAG, new_webhook_id, queued_row
from worker.core.states import State, can_transition
from worker.core.steps import Publisher, Step
from worker.core.validation import ImageInput, NewJob  # NewJob re-exported: the validated request lives with its checks
from worker.errors import IdempotencyConflict, IdempotencyMismatch, IllegalTransition, InvalidInput, JobNotFound

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | str) -> datetime:
    """An aggregate's datetime as an aware UTC datetime (SQLite's min()/max() bypass the column
    type and answer naive values or strings)."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value
    return datetime.fromisoformat(str(value)).replace(tzinfo=timezone.utc)


JOBS = cast(Table, Job.__table__)
EVENTS = cast(Table, JobEvent.__table__)


def _event(session: Session, job_id: str, src: State | None, dst: State, reason: str, at: datetime) -> None:
    # Core, not the ORM unit of work: one INSERT now, no identity-map bookkeeping.
    session.execute(
        insert(EVENTS).values(job_id=job_id, from_state=src.value if src else None, to_state=dst.value, reason=reason[:2000], at=at)
    )


class JobObserver(Protocol):
    """Told of every committed creation and transition (metrics: adapters/telemetry.Recorder).
    Called after the commit, on the committing thread: must not block (no I/O)."""

    def job_created(self, tenant: str | None) -> None: ...
    def job_moved(self, src: str, dst: str, *, tenant: str | None, error_code: str | None, age_seconds: float | None) -> None: ...


OBSERVER = "edit_worker.job_observer"  # the key in a session's `info` (set on the factory: observe_jobs)
_PENDING = "edit_worker.observed"


def observe_jobs(sessions: sessionmaker[Session], observer: JobObserver) -> None:
    """Report the committed creations and transitions of jobs made through `sessions` to `observer`
    (engine/deps.py wires the process's metrics recorder; tests pass their own)."""
    sessions.configure(info={**(sessions.kw.get("info") or {}), OBSERVER: observer})


def _observer(info: dict | None) -> JobObserver | None:
    return (info or {}).get(OBSERVER)


def _note(session: Session, call: Callable[[JobObserver], None]) -> None:
    # Held until the transaction commits (a rolled-back transition is never counted).
    if _observer(session.info) is not None:
        session.info.setdefault(_PENDING, []).append(call)


@event.listens_for(Session, "after_commit")
def _report_committed(session: Session) -> None:
    calls = session.info.pop(_PENDING, None)
    observer = _observer(session.info)
    if calls and observer is not None:
        for call in calls:
            try:
                call(observer)
            except Exception:  # metrics never break a committed transition
                pass


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def _created_call(tenant: str | None) -> Callable[[JobObserver], None]:
    return lambda o: o.job_created(tenant)


def _moved_call(src: State, dst: State, row: Row, fields: dict[str, Any], now: datetime) -> Callable[[JobObserver], None]:
    created = getattr(row, "created_at", None)
    age = (now - as_utc(created)).total_seconds() if created is not None else None
    code = fields.get("error_code")
    tenant = getattr(row, "tenant", None)
    return lambda o: o.job_moved(src.value, dst.value, tenant=tenant, error_code=code if isinstance(code, str) else None, age_seconds=age)


def _known_keys(session: Session, requests: list[NewJob], now: datetime) -> dict[tuple[str, str], tuple[Job, str | None]]:
    """Live idempotency keys among `requests`: (tenant, key) -> (its job, the fingerprint stored)."""
    wanted = {(r.tenant, r.idempotency_key) for r in requests if r.idempotency_key}
    if not wanted:
        return {}
    rows = session.execute(
        select(IdempotencyKey.tenant, IdempotencyKey.key, IdempotencyKey.fingerprint, Job)
        .join(Job, Job.id == IdempotencyKey.job_id)
        .where(tuple_(IdempotencyKey.tenant, IdempotencyKey.key).in_(sorted(wanted)), IdempotencyKey.expires_at > now)
    ).all()
    return {(tenant, key): (job, fingerprint) for tenant, key, fingerprint, job in rows}


def _same_request(key: str, stored: str | None, req: NewJob) -> None:
    if stored is not None and stored != req.fingerprint():
        raise IdempotencyMismatch(
            f"idempotency key {key!r} was already used with a different request (image, prompt, size, seed or priority); "
            "use a new key for a new request"
        )


class InputStore(Protocol):
    """Where admission puts input images (storage.Storage in production)."""

    def put_input_content(self, digest: str, data: bytes, content_type: str) -> str:
        """Store the bytes at a key named by their sha256 `digest` (once: bytes already there are
        not sent again); answer the object's URI. Raises StorageError when it cannot."""
        ...


@dataclass(frozen=True)
class StoredInput:
    uri: str  # the s3:// URI of the stored bytes, or the public URL the provider fetches
    sha256: str | None  # of the stored bytes; None for a URL


def store_inputs(inputs: InputStore | None, images: list[tuple[str, ImageInput]], *, threads: int = 8) -> dict[str, StoredInput]:
    """Put the images given as bytes into the input store, keyed by job id. Content-addressed:
    the same bytes are stored once (one object per distinct image, however many jobs use it;
    distinct images upload concurrently). A URL input is stored as the URL itself. Any
    StorageError propagates: the caller writes nothing."""
    stored: dict[str, StoredInput] = {}
    by_digest: dict[str, tuple[bytes, str, list[str]]] = {}
    for job_id, image in images:
        if image.url is not None:
            stored[job_id] = StoredInput(image.url, None)
            continue
        data, content_type = image.content()
        digest = image.sha256
        by_digest.setdefault(digest, (data, content_type, []))[2].append(job_id)
    if not by_digest:
        return stored
    if inputs is None:
        raise ValueError("an image given as bytes needs an input store (S3) to be admitted")
    store = inputs
    uploads = [(digest, data, content_type) for digest, (data, content_type, _) in by_digest.items()]
    if len(uploads) == 1:
        uris = [store.put_input_content(*uploads[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(uploads)), thread_name_prefix="admit") as pool:
            uris = list(pool.map(lambda upload: store.put_input_content(*upload), uploads))
    for (digest, _, _), uri in zip(uploads, uris):
        for job_id in by_digest[digest][2]:
            stored[job_id] = StoredInput(uri, digest)
    return stored


def _default_callbacks(sessions: sessionmaker[Session], tenants: set[str]) -> dict[str, str]:
    """The tenants' default callback URLs (`edit-worker tenants set NAME --callback-url`)."""
    if not tenants:
        return {}
    with sessions() as session:
        rows = session.execute(
            select(Tenant.name, Tenant.callback_url).where(Tenant.name.in_(sorted(tenants)), Tenant.callback_url.is_not(None))
        )
        return {name: url for name, url in rows if url is not None}


def create_jobs(
    sessions: sessionmaker[Session],
    requests: Iterable[NewJob],
    *,
    deadline_seconds: float,
    idempotency_ttl: float = 86400.0,
    clock: Clock = utcnow,
    inputs: InputStore | None = None,
    trace: Callable[[str, str], str | None] | None = None,
    default_callbacks: dict[str, str] | None = None,
) -> list[tuple[Job, bool]]:
    """Insert jobs (state queued) with their event and outbox row in one transaction per batch.

    Idempotency keys are unique per tenant for `idempotency_ttl` seconds: the same key with the
    same request returns the existing job with created=False and stores and writes nothing; with a
    different request it raises IdempotencyMismatch and nothing of the batch is written. An expired
    key starts a new job. The input images go to `inputs` first, outside any transaction: if the
    store fails (StorageError) nothing is written — a job is never admitted without its image, and
    the row never holds the image's bytes. `trace(job_id, tenant)` starts a new job's trace and
    answers the traceparent its row keeps (adapters/tracing.py). `default_callbacks`: the tenants'
    default callback URLs when the caller has read them already (None: read here). Returns (job,
    created) pairs in input order; a created job is a transient Job holding the row's values.
    """
    requests = list(requests)
    # Chosen once: if a race on an idempotency key makes us go round again, a re-stored input
    # overwrites the same object instead of leaving another behind.
    ids = [str(uuid.uuid4()) for _ in requests]
    stored: dict[str, StoredInput] = {}
    for _attempt in range(3):
        now = clock()
        with sessions() as session:
            existing = _known_keys(session, requests, now)
        plan: list[Job | int] = []  # per request: the existing job, or the index of the request that creates it
        first_of_key: dict[tuple[str, str], int] = {}
        for index, req in enumerate(requests):
            scoped = (req.tenant, req.idempotency_key) if req.idempotency_key else None
            if scoped and scoped in existing:
                job, fingerprint = existing[scoped]
                _same_request(scoped[1], fingerprint, req)
                plan.append(job)
            elif scoped and scoped in first_of_key:  # the same key twice in one batch: one job
                _same_request(scoped[1], requests[first_of_key[scoped]].fingerprint(), req)
                plan.append(first_of_key[scoped])
            else:
                if scoped:
                    first_of_key[scoped] = index
                plan.append(index)
        fresh = [index for index, step in enumerate(plan) if not isinstance(step, Job) and step == index]
        defaults = (
            default_callbacks
            if default_callbacks is not None
            else _default_callbacks(sessions, {requests[i].tenant for i in fresh if requests[i].callback_url is None})
        )
        stored.update(store_inputs(inputs, [(ids[i], requests[i].image) for i in fresh if ids[i] not in stored]))
        now = clock()
        created = {
            index: _new_job(requests[index], ids[index], stored[ids[index]], defaults, now, deadline_seconds, trace) for index in fresh
        }
        try:
            _insert_jobs(sessions, [(requests[index], created[index]) for index in fresh], now, idempotency_ttl)
        except IntegrityError:
            # Another producer inserted one of these idempotency keys meanwhile: re-read and
            # answer its job instead (the primary key on (tenant, key) makes the race harmless).
            continue
        results: list[tuple[Job, bool]] = []
        for index, step in enumerate(plan):
            results.append((step, False) if isinstance(step, Job) else (created[step], step == index))
        return results
    raise IdempotencyConflict("could not create jobs: idempotency keys kept conflicting; try again")


def _new_job(
    req: NewJob,
    job_id: str,
    stored: StoredInput,
    defaults: dict[str, str],
    now: datetime,
    deadline_seconds: float,
    trace: Callable[[str, str], str | None] | None = None,
) -> Job:
    # A transient Job (never added to a session): the caller's answer, and the row's values.
    return Job(
        id=job_id,
        state=State.QUEUED.value,
        prompt=req.prompt,
        size=req.size,
        seed=req.seed,
        image_ref=req.image.ref,
        image_uri=stored.uri,
        image_sha256=stored.sha256,
        image_payload=None,
        enable_base64_output=req.enable_base64_output,
        idempotency_key=req.idempotency_key,
        tenant=req.tenant,
        priority=req.priority,
        callback_url=req.callback_url or defaults.get(req.tenant),
        trace_parent=trace(job_id, req.tenant) if trace is not None else None,
        paid_submissions=0,
        attempts=0,
        outputs=[],
        has_nsfw_contents=[],
        poll_seq=0,
        deadline_at=now + timedelta(seconds=deadline_seconds),
        created_at=now,
        updated_at=now,
    )


_JOB_COLUMNS = tuple(
    column.key
    for column in JOBS.columns
    if column.key not in ("prediction_id", "provider_outputs", "error_code", "error_message", "next_poll_at", "next_attempt_at")
    and column.key not in ("submitted_at", "finished_at")
)
OUTBOX = cast(Table, Outbox.__table__)
KEYS = cast(Table, IdempotencyKey.__table__)


def _insert_jobs(sessions: sessionmaker[Session], new: list[tuple[NewJob, Job]], now: datetime, idempotency_ttl: float) -> None:
    """One transaction, one multi-row INSERT per table (jobs, then their events, outbox rows and
    idempotency keys: foreign-key order): Core executemany, no per-row ORM unit of work. An
    IntegrityError (a live idempotency key another producer just wrote) rolls all of it back."""
    if not new:
        return
    with sessions() as session:
        session.execute(insert(JOBS), [{name: getattr(job, name) for name in _JOB_COLUMNS} for _, job in new])
        session.execute(
            insert(EVENTS),
            [{"job_id": job.id, "from_state": None, "to_state": State.QUEUED.value, "reason": "created", "at": now} for _, job in new],
        )
        session.execute(insert(OUTBOX), [{"job_id": job.id, "task": Step.SUBMIT.value, "created_at": now} for _, job in new])
        keyed = [(req, job) for req, job in new if req.idempotency_key]
        if keyed:
            # An expired key of a tenant is replaced; a live one is the unique conflict on insert.
            session.execute(
                delete(KEYS).where(
                    tuple_(KEYS.c.tenant, KEYS.c.key).in_(sorted({(req.tenant, cast(str, req.idempotency_key)) for req, _ in keyed})),
                    KEYS.c.expires_at <= now,
                )
            )
            expires = now + timedelta(seconds=idempotency_ttl)
            session.execute(
                insert(KEYS),
                [
                    {
                        "tenant": req.tenant,
                        "key": req.idempotency_key,
                        "job_id": job.id,
                        "fingerprint": req.fingerprint(),
                        "expires_at": expires,
                    }
                    for req, job in keyed
                ],
            )
        for req, _ in new:
            _note(session, _created_call(req.tenant))
        session.commit()


def _check_edge(job_id: str, src: State, dst: State) -> None:
    if not can_transition(src, dst):
        raise IllegalTransition(f"job {job_id}: {src} -> {dst} is not an allowed transition")


def _move_values(dst: State, now: datetime, fields: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {"state": dst.value, "updated_at": now, **fields}
    if dst.terminal:
        values.setdefault("finished_at", now)
        values.setdefault("next_poll_at", None)
        values.setdefault("next_attempt_at", None)
    return values


def _conditions(job_id: str, state: State, where: dict[str, Any] | None) -> list:
    cond = [JOBS.c.id == job_id, JOBS.c.state == state.value]
    cond += [JOBS.c[column] == value if value is not None else JOBS.c[column].is_(None) for column, value in (where or {}).items()]
    return cond


def transition(
    session: Session,
    job_id: str,
    src: State,
    dst: State,
    reason: str,
    *,
    clock: Clock = utcnow,
    where: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Compare-and-set `src -> dst` (plus column updates) and write its event, in the caller's
    transaction. False when the row was not in `src` any more (or a `where` column differs):
    someone else moved it, and the caller's message is stale. An edge the machine does not have
    raises IllegalTransition. Into a terminal state, a job with a callback_url also gets its
    delivery row here (deliveries.callbacks_queued(session) tells the caller to wake the loop)."""
    _check_edge(job_id, src, dst)
    return _move(session, job_id, src, dst, reason, clock(), where, (), fields) is not None


def _move(
    session: Session,
    job_id: str,
    src: State,
    dst: State,
    reason: str,
    now: datetime,
    where: dict[str, Any] | None,
    returning: tuple[str, ...],
    fields: dict[str, Any],
) -> Row | None:
    """The compare-and-set UPDATE and, if it moved the row, its event (and callback delivery), in
    the session's transaction."""
    cols = [JOBS.c.id, *(JOBS.c[name] for name in _returning(dst, returning, observed=_observer(session.info) is not None))]
    row = session.execute(
        update(JOBS).where(*_conditions(job_id, src, where)).values(**_move_values(dst, now, fields)).returning(*cols)
    ).first()
    if row is not None:
        _event(session, job_id, src, dst, reason, now)
        _note(session, _moved_call(src, dst, row, fields, now))
        if dst.terminal and row.callback_url is not None:
            session.execute(insert(DELIVERIES).values(**queued_row(job_id, dst.value, row.callback_url, new_webhook_id(), now)))
            session.info[QUEUED_FLAG] = True
    return row


def _returning(dst: State, returning: tuple[str, ...], *, observed: bool = False) -> tuple[str, ...]:
    # Into a terminal state the UPDATE also answers callback_url: the delivery is queued from it;
    # when observed, also created_at and tenant (the job's age and its tenant label).
    extra = (("callback_url",) if dst.terminal else ()) + (("created_at", "tenant") if observed else ())
    return returning + tuple(name for name in extra if name not in returning)


def transition_now(
    sessions: sessionmaker[Session],
    job_id: str,
    src: State,
    dst: State,
    reason: str,
    *,
    clock: Clock = utcnow,
    where: dict[str, Any] | None = None,
    returning: tuple[str, ...] = (),
    **fields: Any,
) -> Row | None:
    """`transition` as a transaction of its own, for the hot path: on PostgreSQL one statement
    (`WITH moved AS (UPDATE … RETURNING …), ev AS (INSERT INTO job_events …) SELECT … FROM moved`)
    on an autocommit connection — one round trip, atomic; elsewhere UPDATE + INSERT in a session.
    Into a terminal state the same statement queues the job's callback delivery (`cb AS (INSERT
    INTO callback_deliveries …)`). Returns the moved row's `returning` columns (always including
    `id`; into a terminal state also `callback_url`: not None means a delivery was queued), or None
    when the CAS lost."""
    _check_edge(job_id, src, dst)
    now = clock()
    engine = sessions.kw["bind"]
    if engine.dialect.name == "postgresql":
        observer = _observer(sessions.kw.get("info"))
        stmt, params = _move_statement(src, dst, _move_values(dst, now, fields), where or {}, returning, observed=observer is not None)
        params.update(job_id=job_id, ev_reason=reason[:2000], ev_at=now)
        if dst.terminal:
            params.update(cb_webhook_id=new_webhook_id())
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            moved = conn.execute(stmt, params).first()
        if moved is not None and observer is not None:
            try:
                _moved_call(src, dst, moved, fields, now)(observer)
            except Exception:  # metrics never break a committed transition
                pass
        return moved
    with sessions() as session:
        row = _move(session, job_id, src, dst, reason, now, where, returning, fields)
        session.commit()
        return row


_MOVES: dict[tuple, Any] = {}


def _move_statement(
    src: State, dst: State, values: dict[str, Any], where: dict[str, Any], returning: tuple[str, ...], *, observed: bool = False
) -> tuple[Any, dict[str, Any]]:
    """The PostgreSQL CTE for a transition, built once per shape (which columns are set, which are
    compared, what comes back) with every value a bound parameter: building a statement and its
    cache key costs more than executing it."""
    params: dict[str, Any] = {}
    shape_values: list[tuple[str, str | None]] = []
    for name, value in values.items():
        if isinstance(value, ClauseElement):
            shape_values.append((name, str(value)))  # an expression such as poll_seq + 1: part of the shape
        else:
            shape_values.append((name, None))
            params[f"v_{name}"] = value
    shape_where: list[tuple[str, bool]] = []
    for name, value in where.items():
        shape_where.append((name, value is None))
        if value is not None:
            params[f"w_{name}"] = value
    returning = _returning(dst, returning, observed=observed)
    key = (src, dst, tuple(shape_values), tuple(shape_where), returning)
    stmt = _MOVES.get(key)
    if stmt is None:
        c = JOBS.c
        cond = [c.id == bindparam("job_id"), c.state == src.value]
        cond += [c[name].is_(None) if is_null else c[name] == bindparam(f"w_{name}", type_=c[name].type) for name, is_null in shape_where]
        sets = {name: values[name] if expr is not None else bindparam(f"v_{name}", type_=c[name].type) for name, expr in shape_values}
        moved = update(JOBS).where(*cond).values(**sets).returning(c.id, *(c[name] for name in returning)).cte("moved")
        ev = (
            insert(EVENTS)
            .from_select(
                ["job_id", "from_state", "to_state", "reason", "at"],
                select(
                    moved.c.id,
                    literal(src.value, EVENTS.c.from_state.type),
                    literal(dst.value, EVENTS.c.to_state.type),
                    bindparam("ev_reason", type_=EVENTS.c.reason.type),
                    bindparam("ev_at", type_=EVENTS.c.at.type),
                ),
            )
            .cte("ev")
        )
        stmt = select(*moved.c).add_cte(ev)
        if dst.terminal:
            # The callback delivery, in the same statement: no terminal job with a callback_url
            # can exist without its delivery row, whatever crashes after the commit.
            at = bindparam("ev_at", type_=DELIVERIES.c.created_at.type)
            values = queued_row(
                moved.c.id,
                literal(dst.value, DELIVERIES.c.state.type),
                moved.c.callback_url,
                bindparam("cb_webhook_id", type_=DELIVERIES.c.webhook_id.type),
                at,
            )
            values["status"] = literal(values["status"], DELIVERIES.c.status.type)
            values["attempts"] = literal(values["attempts"], DELIVERIES.c.attempts.type)
            cb = insert(DELIVERIES).from_select(list(values), select(*values.values()).where(moved.c.callback_url.is_not(None))).cte("cb")
            stmt = stmt.add_cte(cb)
        _MOVES[key] = stmt
    return stmt, params


@dataclass(frozen=True)
class Move:
    """One job of a `transition_many`: its reason (the event row's text), the claim version the
    CAS also checks (`seq`: the row's poll_seq; None: state only) and its own column values."""

    job_id: str
    reason: str
    seq: int | None = None
    values: dict[str, Any] = field(default_factory=dict)


_MANY: dict[tuple, Any] = {}


def transition_many(
    sessions: sessionmaker[Session], src: State, dst: State, moves: list[Move], *, clock: Clock = utcnow, **fields: Any
) -> dict[str, Row]:
    """`transition_now` for a batch: each job's own compare-and-set `src -> dst` (state, and
    poll_seq where its Move has a seq) with its event row (and, into a terminal state, its
    callback delivery), all in one transaction. Every Move carries the same column names in
    `values` (per job) and `fields` apply to all. On PostgreSQL one statement: the rows travel as
    one JSON parameter (json_to_recordset: the `values` must be JSON-able), `UPDATE … FROM` it does the CAS of every job, and
    the events and deliveries are inserted from what it RETURNs; elsewhere one session. Returns
    the moved jobs by id (each Row has `id` and `callback_url`); a job missing lost its CAS."""
    for move in moves:
        _check_edge(move.job_id, src, dst)
    if not moves:
        return {}
    names = tuple(sorted(moves[0].values))
    if any(tuple(sorted(m.values)) != names for m in moves):
        raise ValueError("transition_many: every move must set the same columns")
    now = clock()
    engine = sessions.kw["bind"]
    if engine.dialect.name != "postgresql":
        moved: dict[str, Row] = {}
        with sessions() as session:
            for m in moves:
                where = {"poll_seq": m.seq} if m.seq is not None else None
                row = _move(session, m.job_id, src, dst, m.reason, now, where, ("callback_url",), {**fields, **m.values})
                if row is not None:
                    moved[m.job_id] = row
            session.commit()
        return moved
    values = _move_values(dst, now, fields)
    common = tuple(sorted(values))
    key = (src, dst, names, common)
    stmt = _MANY.get(key)
    if stmt is None:
        stmt = _MANY[key] = _many_statement(src, dst, names, common)
    rows = [
        {"id": m.job_id, "seq": m.seq, "reason": m.reason[:2000], "webhook_id": new_webhook_id(), **{n: m.values[n] for n in names}}
        for m in moves
    ]
    params: dict[str, Any] = {"rows": rows, "ev_at": now}
    params.update({f"c_{name}": value for name, value in values.items()})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        moved_rows = {row.id: row for row in conn.execute(stmt, params)}
    observer = _observer(sessions.kw.get("info"))
    if observer is not None:
        for row in moved_rows.values():
            try:
                _moved_call(src, dst, row, fields, now)(observer)
            except Exception:  # metrics never break a committed transition
                pass
    return moved_rows


def _many_statement(src: State, dst: State, names: tuple[str, ...], common: tuple[str, ...]) -> Any:
    c = JOBS.c
    recordset = (
        func.json_to_recordset(bindparam("rows", type_=JSON))
        .table_valued(
            column("id", String),
            column("seq", Integer),
            column("reason", Text),
            column("webhook_id", String),
            *(column(name, c[name].type) for name in names),
        )
        .render_derived(name="v", with_types=True)
    )
    sets: dict[str, Any] = {name: bindparam(f"c_{name}", type_=c[name].type) for name in common}
    sets.update({name: recordset.c[name] for name in names})
    moved = (
        update(JOBS)
        .where(
            c.id == recordset.c.id,
            c.state == src.value,
            or_(recordset.c.seq.is_(None), c.poll_seq == recordset.c.seq),
        )
        .values(**sets)
        .returning(
            c.id,
            c.callback_url,
            c.tenant,
            c.created_at,
            recordset.c.reason.label("ev_reason"),
            recordset.c.webhook_id.label("cb_webhook_id"),
        )
        .cte("moved")
    )
    ev = (
        insert(EVENTS)
        .from_select(
            ["job_id", "from_state", "to_state", "reason", "at"],
            select(
                moved.c.id,
                literal(src.value, EVENTS.c.from_state.type),
                literal(dst.value, EVENTS.c.to_state.type),
                moved.c.ev_reason,
                bindparam("ev_at", type_=EVENTS.c.at.type),
            ),
        )
        .cte("ev")
    )
    stmt = select(moved.c.id, moved.c.callback_url, moved.c.tenant, moved.c.created_at).add_cte(ev)
    if dst.terminal:
        at = bindparam("ev_at", type_=DELIVERIES.c.created_at.type)
        row = queued_row(moved.c.id, literal(dst.value, DELIVERIES.c.state.type), moved.c.callback_url, moved.c.cb_webhook_id, at)
        row["status"] = literal(row["status"], DELIVERIES.c.status.type)
        row["attempts"] = literal(row["attempts"], DELIVERIES.c.attempts.type)
        cb = insert(DELIVERIES).from_select(list(row), select(*row.values()).where(moved.c.callback_url.is_not(None))).cte("cb")
        stmt = stmt.add_cte(cb)
    return stmt


def update_if(
    session: Session, job_id: str, state: State, *, clock: Clock = utcnow, where: dict[str, Any] | None = None, **fields: Any
) -> bool:
    """Compare-and-set column updates that keep the state (poll bookkeeping, deferrals)."""
    result = cast(
        CursorResult, session.execute(update(JOBS).where(*_conditions(job_id, state, where)).values(updated_at=clock(), **fields))
    )
    return result.rowcount == 1


def take_over_poll(session: Session, job_id: str, poll_seq: int, *, clock: Clock = utcnow) -> int | None:
    """Take a processing job's polling over from whoever holds claim version `poll_seq`: bump the
    version (an old poll chain or poller becomes stale) and make it due now. The new version, or
    None if the job moved on or someone else took it first."""
    moved = update_if(
        session, job_id, State.PROCESSING, clock=clock, where={"poll_seq": poll_seq}, poll_seq=poll_seq + 1, next_poll_at=clock()
    )
    return poll_seq + 1 if moved else None


def get_job(sessions: sessionmaker[Session], job_id: str, *, with_payloads: bool = False, tenant: str | None = None) -> Job:
    """The job; JobNotFound if there is none — or if `tenant` is given and the job is another
    tenant's (a caller cannot even learn that another tenant's job exists)."""
    if not isinstance(job_id, str) or not 0 < len(job_id) <= 36 or not job_id.isascii() or not job_id.isprintable():
        # Job ids are UUIDs: text that cannot be one is not looked up (PostgreSQL refuses NUL).
        raise JobNotFound(f"no job {str(job_id)[:40]!r}")
    with sessions() as session:
        options = [undefer(Job.image_payload), undefer(Job.provider_outputs)] if with_payloads else []
        job = session.get(Job, job_id, options=options)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise JobNotFound(f"no job {job_id}")
        return job


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None  # pass as `after` for the next page; None on the last page


def encode_cursor(job: Job) -> str:
    """An opaque page cursor: the position (created_at, id) of the last job shown."""
    raw = f"{as_utc(job.created_at).isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor.strip() + "=" * (-len(cursor.strip()) % 4)).decode()
        when, job_id = raw.split("|", 1)
        created_at = datetime.fromisoformat(when)
    except (ValueError, UnicodeError):
        raise InvalidInput("cursor is not one this API gave out") from None
    if created_at.tzinfo is None or not job_id or len(job_id) > 36:
        raise InvalidInput("cursor is not one this API gave out")
    return created_at, job_id


@dataclass(frozen=True)
class JobFilter:
    """Which jobs an operator is looking at (the console's filters; every field optional).
    `since`: finished (or last changed) at or after — the bulk actions' `since`; `text`: a
    case-insensitive substring of the prompt or the idempotency key."""

    states: tuple[State, ...] = ()
    tenant: str | None = None
    error_code: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    since: datetime | None = None
    text: str | None = None

    def conditions(self) -> list:
        cond: list = []
        if self.states:
            cond.append(Job.state.in_([s.value for s in self.states]))
        if self.tenant is not None:
            cond.append(Job.tenant == self.tenant)
        if self.error_code:
            cond.append(Job.error_code == self.error_code)
        if self.created_from is not None:
            cond.append(Job.created_at >= self.created_from)
        if self.created_to is not None:
            cond.append(Job.created_at < self.created_to)
        if self.since is not None:
            cond.append(func.coalesce(Job.finished_at, Job.updated_at) >= self.since)
        if self.text:
            cond.append(Job.prompt.icontains(self.text, autoescape=True) | Job.idempotency_key.icontains(self.text, autoescape=True))
        return cond


def list_jobs(
    sessions: sessionmaker[Session],
    *,
    state: State | None = None,
    limit: int = 100,
    offset: int = 0,
    after: str | None = None,
    tenant: str | None = None,
) -> list[Job]:
    return list_page(sessions, state=state, limit=limit, offset=offset, after=after, tenant=tenant).jobs


def list_page(
    sessions: sessionmaker[Session],
    *,
    state: State | None = None,
    limit: int = 100,
    offset: int = 0,
    after: str | None = None,
    tenant: str | None = None,
) -> JobPage:
    """Jobs newest first, by keyset: `after` (a cursor from the previous page) seeks into the
    (created_at, id) index, so page N costs what page 1 costs. `offset` stays for old callers. `tenant`: one tenant's jobs (None: every tenant's)."""
    flt = JobFilter(states=(state,) if state is not None else (), tenant=tenant)
    return filtered_page(sessions, flt, limit=limit, after=after, offset=offset)


def filtered_page(
    sessions: sessionmaker[Session], flt: JobFilter, *, limit: int = 100, after: str | None = None, offset: int = 0
) -> JobPage:
    """One page of the jobs `flt` selects, newest first, by keyset (`after`: the previous page's
    cursor); never OFFSET unless an old caller asks for it."""
    with sessions() as session:
        query = select(Job).where(*flt.conditions()).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        if after:
            created_at, job_id = decode_cursor(after)
            query = query.where(tuple_(Job.created_at, Job.id) < tuple_(bindparam("c_at", created_at, type_=Job.created_at.type), job_id))
        if offset:
            query = query.offset(offset)
        rows = list(session.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    return JobPage(jobs=rows, next_cursor=encode_cursor(rows[-1]) if more and rows else None)


def count_by_state(sessions: sessionmaker[Session], flt: JobFilter | None = None) -> dict[str, int]:
    """Jobs per state (of those `flt` selects, its own state filter left out: every state's count)."""
    cond = replace(flt, states=()).conditions() if flt is not None else []
    with sessions() as session:
        return {state: n for state, n in session.execute(select(Job.state, func.count()).where(*cond).group_by(Job.state))}


def count_outbox_backlog(sessions: sessionmaker[Session]) -> int:
    """Outbox rows not yet relayed (an index range on sent_at IS NULL)."""
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Outbox).where(Outbox.sent_at.is_(None))) or 0)


def job_events(sessions: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with sessions() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def iso(value: datetime | None) -> str | None:
    """An ISO 8601 UTC time with a Z (the job JSON's time format)."""
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if value else None


def to_json(job: Job, *, output_urls: list[str] | None = None, cost_per_submission: float = 0.0) -> dict[str, Any]:
    """The job object of the contract (DESIGN §4) — keep these names and shapes. `output_urls`:
    links a browser can open for each output (presigned; the caller makes them)."""
    error = {"code": job.error_code, "message": job.error_message} if (job.error_code or job.error_message) else None
    return {
        "id": job.id,
        "state": job.state,
        "prompt": job.prompt,
        "size": job.size,
        "seed": job.seed,
        "idempotency_key": job.idempotency_key,
        "prediction_id": job.prediction_id,
        "attempts": job.attempts,
        "outputs": list(job.outputs or []),
        "has_nsfw_contents": list(job.has_nsfw_contents or []),
        "error": error,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "finished_at": iso(job.finished_at),
        "tenant": job.tenant,
        "priority": job.priority,
        "callback_url": getattr(job, "callback_url", None),
        "output_urls": list(output_urls or []),
        "paid_submissions": job.paid_submissions or 0,
        "cost": round((job.paid_submissions or 0) * cost_per_submission, 6),
    }


def event_json(event: JobEvent) -> dict[str, Any]:
    return {"from": event.from_state, "to": event.to_state, "reason": event.reason, "at": iso(event.at)}


# --- outbox -----------------------------------------------------------------------------------


def add_outbox(session: Session, job_id: str, step: Step, now: datetime) -> None:
    session.add(Outbox(job_id=job_id, task=Step(step).value, created_at=now))


def pending_outbox(
    sessions: sessionmaker[Session], *, older_than: datetime | None = None, limit: int = 500, job_ids: list[str] | None = None
) -> list[Outbox]:
    with sessions() as session:
        query = select(Outbox).where(Outbox.sent_at.is_(None)).order_by(Outbox.id).limit(limit)
        if older_than is not None:
            query = query.where(Outbox.created_at <= older_than)
        if job_ids is not None:
            query = query.where(Outbox.job_id.in_(job_ids))
        return list(session.scalars(query))


def publish_outbox(publisher: Publisher, rows: list[Outbox], sent: list[int], *, batch_submit: bool) -> None:
    """Publish outbox rows, appending each published row's id to `sent` as it goes (a failure
    leaves the rest for the relay's next run). With batch_submit, all submit rows become one
    submitter wake-up: the submitter leases queued jobs from the table, it needs no message per job."""
    submits = [row.id for row in rows if row.task == Step.SUBMIT.value] if batch_submit else []
    if submits:
        publisher.publish(Step.SUBMIT_DUE)
        sent.extend(submits)
    for row in rows:
        if row.task == Step.SUBMIT.value and batch_submit:
            continue
        publisher.publish(Step(row.task), row.job_id)
        sent.append(row.id)


def mark_submits_sent(sessions: sessionmaker[Session], job_ids: list[str], *, clock: Clock = utcnow) -> None:
    """Mark the unsent submit outbox rows of these (just-created) jobs as published: one UPDATE."""
    if not job_ids:
        return
    with sessions() as session:
        session.execute(
            update(Outbox)
            .where(Outbox.job_id.in_(job_ids), Outbox.task == Step.SUBMIT.value, Outbox.sent_at.is_(None))
            .values(sent_at=clock())
        )
        session.commit()


def mark_sent(sessions: sessionmaker[Session], ids: list[int], *, clock: Clock = utcnow) -> None:
    if not ids:
        return
    with sessions() as session:
        session.execute(update(Outbox).where(Outbox.id.in_(ids), Outbox.sent_at.is_(None)).values(sent_at=clock()))
        session.commit()
