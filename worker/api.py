"""The HTTP API (FastAPI): create, read, list, cancel and retry jobs (one at a time or by filter),
result links, API keys and tenant usage, the WaveSpeed webhook receiver, Prometheus metrics and a
health check, and the operator console at /ui (worker/console.py). Thin over the job service, the
producer and the engine's operator actions.

Every route but the provider's webhook and the health check needs `Authorization: Bearer <key>`
(`edit-worker keys create`); a tenant's key sees only its tenant's jobs (another tenant's job id
answers 404), an admin key sees every tenant. Every refusal answers `{"error": {"code": …,
"message": …}}` and writes nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import console
from worker.adapters import webhooks
from worker.adapters.database import get_engine, session_factory
from worker.adapters.redis_keys import webhook_seen_name
from worker.adapters.tracing import Tracing
from worker.config import Settings, get_settings
from worker.core import jobs, tenants
from worker.core.deliveries import delivery_json, list_deliveries
from worker.core.jobs import InputStore
from worker.core.states import State
from worker.core.steps import Publisher
from worker.core.tenants import Caller
from worker.core.validation import NewJob, Resolver, validate_callback_url, validate_request
from worker.engine import callbacks, operator, reconciler
from worker.engine.wakeups import poller_wakeup
from worker.engine.webhooks import NudgeOutcome, nudge_poll
from worker.errors import (
    AdmissionUnavailable,
    IdempotencyMismatch,
    InvalidInput,
    InvalidJobOperation,
    JobNotFound,
    QuotaExceeded,
    StorageError,
    Unauthorized,
)
from worker.metrics import Metrics, TotalsCollector, fleet_collector
from worker.producer import enqueue_pairs
from worker.views import job_view, nth_output_link

log = logging.getLogger(__name__)

# `offset` paging reads and drops every skipped row; `cursor` paging does not. Deep offsets are refused.
MAX_OFFSET = 10_000


class ErrorCode(str, Enum):
    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    INVALID_OPERATION = "invalid_operation"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    QUOTA_EXCEEDED = "quota_exceeded"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    HTTP_ERROR = "http_error"


def error_response(status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code.value, "message": message}}, headers=headers)


# --- the OpenAPI shapes (what every route answers, errors included) --------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every refusal: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class CreateJob(BaseModel):
    # Unknown fields are refused: a typo like "sead" must not silently become a random seed.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image": "https://images.example.com/cat.png", "prompt": "make the sky purple"},
                {
                    "image": "https://images.example.com/cat.png",
                    "prompt": "add a red hat",
                    "size": "1024*768",
                    "seed": 7,
                    "idempotency_key": "order-1",
                },
            ]
        },
    )

    image: str = Field(description="an http(s) URL, a data:image/...;base64 URI or bare base64 of a PNG, JPEG or WebP")
    prompt: str = Field(description="1..120 characters")
    size: str | None = Field(None, description="W*H, each side 512..2048; default 1328*1328")
    seed: int | None = Field(None, description="-1..2147483647; -1 (default) is random")
    idempotency_key: str | None = Field(
        None,
        description="1..255 characters; per tenant, for EDIT_WORKER_IDEMPOTENCY_TTL_SECONDS: the same key with the same request answers the same job (200), with another request 409",
    )
    priority: str | None = Field(None, description="high | normal | low: the order of your own queued jobs (default normal)")
    callback_url: str | None = Field(
        None,
        description="https URL to POST the signed job JSON to on every terminal state (default: the tenant's; Standard Webhooks signature)",
    )
    tenant: str | None = Field(None, description="admin keys only: create the job for this tenant (default: the key's own)")


MAX_BATCH_JOBS = 1000


class CreateJobs(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "jobs": [
                        {"image": "https://images.example.com/cat.png", "prompt": "make the sky purple", "idempotency_key": "order-1"},
                        {"image": "https://images.example.com/dog.png", "prompt": "add a red hat", "seed": 7},
                    ]
                }
            ]
        },
    )

    jobs: list[CreateJob] = Field(
        min_length=1, max_length=MAX_BATCH_JOBS, description=f"1..{MAX_BATCH_JOBS} job requests, each as for POST /jobs"
    )


class ItemError(BaseModel):
    index: int = Field(description="0-based position of the refused job request in `jobs`")
    message: str


class BatchErrorDetail(ErrorDetail):
    items: list[ItemError] = Field(default_factory=list, description="each refused job request (a 422 naming items); else empty")


class BatchErrorBody(BaseModel):
    """A refused batch: nothing of it was written."""

    error: BatchErrorDetail


class JobBatchOut(BaseModel):
    jobs: list[JobOut] = Field(description="the jobs, in the order of the request")


class BulkFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_code: str | None = Field(None, description="only jobs with this error code")
    since: datetime | None = Field(None, description="only jobs that finished (or last changed) at or after this time (ISO 8601)")
    state: str | None = Field(None, description="cancel only: only jobs in this unfinished state")
    tenant: str | None = Field(None, description="admin keys only: one tenant's jobs (default: every tenant's)")


class BulkOut(BaseModel):
    count: int
    jobs: list[str]


class DeliveryOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int
    job_id: str
    event: str
    status: str = Field(description="pending | delivered | failed")
    attempts: int
    webhook_id: str
    last_error: str | None


class TenantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: int | None = Field(None, ge=1, le=1000, description="its share of the submitter's turns")
    rate_per_minute: int | None = Field(None, ge=0, le=1_000_000, description="admissions per minute (0: no limit)")
    max_in_flight: int | None = Field(None, ge=0, le=1_000_000, description="jobs at the provider at once (0: no limit)")
    daily_budget: int | None = Field(None, ge=0, le=100_000_000, description="paid jobs per UTC day (0: no limit)")
    callback_url: str | None = Field(None, max_length=4096, description='default callback URL of its jobs ("" removes it)')


class TenantOut(BaseModel):
    tenant: str
    weight: int
    rate_per_minute: int | None
    max_in_flight: int | None
    daily_budget: int | None
    callback_url: str | None


class TenantListOut(BaseModel):
    tenants: list[TenantOut]


class NewKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(description="the tenant the key acts for (created if new)")
    admin: bool = Field(False, description="an admin key sees and acts on every tenant")


class NewKeyOut(BaseModel):
    id: str
    tenant: str
    admin: bool
    key: str = Field(description="shown only in this answer: store it")
    webhook_secret: str = Field(description="the tenant's callback signing secret (Standard Webhooks `whsec_…`)")


class KeyOut(BaseModel):
    id: str
    tenant: str
    admin: bool
    created_at: str | None
    revoked_at: str | None


class KeyListOut(BaseModel):
    keys: list[KeyOut]


class UsageOut(BaseModel):
    tenant: str
    by_state: dict[str, int]
    paid_today: int
    paid_submissions_today: int
    cost_today: float


class UsageListOut(BaseModel):
    tenants: list[UsageOut]


class JobErrorOut(BaseModel):
    code: str | None
    message: str | None


class JobOut(BaseModel):
    """The job object of the contract (DESIGN §4); it may gain fields, never lose or rename one."""

    model_config = ConfigDict(extra="allow")

    id: str
    state: State
    prompt: str
    size: str
    seed: int
    idempotency_key: str | None
    prediction_id: str | None
    attempts: int
    outputs: list[str]
    has_nsfw_contents: list[bool]
    error: JobErrorOut | None
    created_at: str
    updated_at: str
    finished_at: str | None
    tenant: str
    priority: str
    output_urls: list[str] = Field(description="presigned links a browser can open, one per output")
    paid_submissions: int
    cost: float


class JobListOut(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class EventOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: str | None = Field(alias="from")
    to: str
    reason: str
    at: str


class WebhookAck(BaseModel):
    ok: bool
    duplicate: bool = False


class HealthOut(BaseModel):
    ok: bool
    database: bool


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "no API key, or an unknown or revoked one (the webhook: not signed with our secret)",
        403: "the key may not do this (admin keys only)",
        404: "no such job or key (or another tenant's; or webhooks are not configured)",
        409: "the operation does not apply to the job's state, or an idempotency key reused with another request",
        413: "the request body is over the limit",
        422: "invalid input",
        429: "over the tenant's rate or daily budget; see Retry-After",
        503: "the database, Redis or S3 is unavailable; try again",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


class _Forbidden(Exception):
    pass


def _scope(who: Caller, tenant: str | None) -> str | None:
    """The tenant a query is limited to: the caller's own; an admin's choice (None: all)."""
    if tenant is not None and not who.admin and tenant != who.tenant:
        raise _Forbidden("only an admin key may look at another tenant")
    return tenant if who.admin else who.tenant


def _tenant_json(row) -> dict:
    return {
        "tenant": row.name,
        "weight": row.weight,
        "rate_per_minute": row.rate_per_minute,
        "max_in_flight": row.max_in_flight,
        "daily_budget": row.daily_budget,
        "callback_url": row.callback_url,
    }


def _key_json(key) -> dict:
    return {
        "id": key.id,
        "tenant": key.tenant,
        "admin": key.admin,
        "created_at": jobs.iso(key.created_at),
        "revoked_at": jobs.iso(key.revoked_at),
    }


def _celery_publisher() -> Publisher:
    from worker.engine.celery_app import celery_publisher

    return celery_publisher()


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        if error.get("type") == "json_invalid":
            parts.append("request body is not valid JSON")
            continue
        loc = [str(item) for item in error.get("loc", ()) if item != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class BatchInvalid(InvalidInput):
    """Some requests of a batch are invalid: (index, message) for each; nothing is written."""

    def __init__(self, items: list[tuple[int, str]]):
        first_index, first_message = items[0]
        more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
        super().__init__(f"{len(items)} of the batch's job requests are invalid, e.g. jobs[{first_index}]: {first_message}{more}")
        self.items = items


def _batch_refused(exc: BatchInvalid) -> JSONResponse:
    error = {"code": ErrorCode.INVALID_INPUT.value, "message": str(exc), "items": [{"index": i, "message": m} for i, m in exc.items]}
    return JSONResponse(status_code=422, content={"error": error})


def _batch_items(exc: RequestValidationError) -> list[tuple[int, str]]:
    """Schema errors inside `jobs[i]` as (i, message), one per item (its first error); [] when an
    error is not about one item (the body itself, `jobs` missing or too long)."""
    items: dict[int, str] = {}
    for error in exc.errors():
        loc = [item for item in error.get("loc", ()) if item != "body"]
        if len(loc) < 2 or loc[0] != "jobs" or not isinstance(loc[1], int):
            return []
        field = ".".join(str(part) for part in loc[2:]) or "job"
        items.setdefault(loc[1], f"{field}: {error.get('msg', 'invalid')}")
    return sorted(items.items())


class BodyTooLarge(StarletteHTTPException):
    """Raised from inside `receive` once a body passes its limit (FastAPI re-raises HTTP errors
    met while reading a body, so the route never sees the rest)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the limit of {limit} bytes")
        self.limit = limit


class BodyLimit:
    """ASGI middleware: a request body may not pass `limit_for(path)` bytes. A declared
    Content-Length over it is answered 413 at once; a chunked (or lying) body is counted as it
    streams in and cut off at the limit, never read whole."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(limit)(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as exc:  # read outside a route (no handler met it)
            if started:
                raise
            await _too_large(exc.limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, ErrorCode.INVALID_INPUT, f"request body is over the limit of {limit} bytes")


def create_app(
    settings: Settings | None = None,
    *,
    deps_factory: Callable[[], Any] | None = None,
    publisher=None,
    url_resolver: Resolver | None = None,
    storage: InputStore | None = None,
    tracing: Tracing | None = None,
    metrics_totals: TotalsCollector | None = None,
) -> FastAPI:
    """The API over `settings` (default: the environment). `publisher=None` publishes to Celery;
    `deps_factory` builds the engine's Deps for cancel, retry and webhooks (default: `deps.build_deps`);
    `storage` is where input images go at admission (default: S3 as `settings` say); `tracing`
    starts each new job's trace (default: the process's, from settings); `metrics_totals` is what
    `/metrics` reads the fleet's counters from (default: Redis)."""
    settings = settings or get_settings()
    sessions = session_factory(settings.database_url)
    secret = webhooks.webhook_secret(settings)
    fleet_totals = metrics_totals if metrics_totals is not None else fleet_collector(settings)
    metrics = Metrics(
        sessions,
        cache_seconds=settings.metrics_cache_seconds,
        cost_per_submission=settings.cost_per_submission,
        totals=fleet_totals,
    )
    # Base64 inflates by 4/3; the rest of the JSON is small. A webhook only has to name its
    # prediction: one too large to take (base64 outputs) is refused, and the poll finds the result.
    max_body = settings.max_image_bytes * 4 // 3 + 64 * 1024
    webhook_path = "/webhooks/wavespeed"

    batch_path = "/jobs/batch"

    def body_limit(path: str) -> int:
        if path == batch_path:
            return settings.batch_max_bytes
        return settings.webhook_max_bytes if path == webhook_path else max_body

    if deps_factory is None:

        def deps_factory():
            from worker.engine.deps import build_deps

            return build_deps(settings, publisher)

    def get_publisher():
        return publisher if publisher is not None else _celery_publisher()

    def webhook_wakeup() -> Callable[[], Any] | None:
        # Batch poll mode: a webhook makes its job due and wakes the batch poller (one wake-up per
        # half second fleet-wide), never one poll message per webhook.
        if settings.poll_mode != "batch":
            return None
        return lambda: poller_wakeup(deps_factory(), 0.0)

    app = FastAPI(
        title="edit-worker", version="0.1.0", description="Durable WaveSpeed Dreamina V3.0 Edit jobs: submit, status, cancel, retry."
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit_for=body_limit)
    bearer = HTTPBearer(auto_error=False, description="An API key from `edit-worker keys create`.")
    storage_box: list[Any] = []

    def link_storage():
        # Signs result links: one boto3 client per app, made on first use (presigning calls no S3).
        if not storage_box:
            from worker.adapters.storage import Storage

            storage_box.append(storage if isinstance(storage, Storage) else Storage.from_settings(settings))
        return storage_box[0]

    def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        if credentials is None:
            raise Unauthorized("an API key is required: Authorization: Bearer <key> (create one with `edit-worker keys create`)")
        who = tenants.authenticate(sessions, credentials.credentials)
        if who is None:
            raise Unauthorized("the API key is unknown or revoked")
        return who

    def admin(who: Caller = Depends(caller)) -> Caller:
        if not who.admin:
            raise _Forbidden("this needs an admin key")
        return who

    def view(job) -> dict:
        return job_view(job, settings, link_storage())

    # --- errors: one JSON shape for every refusal ---

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path == batch_path:
            items = _batch_items(exc)
            if items:
                return _batch_refused(BatchInvalid(items))
        return error_response(422, ErrorCode.INVALID_INPUT, _validation_message(exc))

    @app.exception_handler(BatchInvalid)
    async def _on_batch_invalid(_request: Request, exc: BatchInvalid) -> JSONResponse:
        return _batch_refused(exc)

    @app.exception_handler(BodyTooLarge)
    async def _on_too_large(_request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _too_large(exc.limit)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8): bad input like any other.
            return error_response(422, ErrorCode.INVALID_INPUT, "request body is not valid JSON")
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 401: ErrorCode.UNAUTHORIZED}.get(
            exc.status_code, ErrorCode.HTTP_ERROR
        )
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(InvalidInput)
    async def _on_invalid(_request: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(422, ErrorCode.INVALID_INPUT, str(exc))

    @app.exception_handler(UnicodeError)
    async def _on_unicode(_request: Request, exc: UnicodeError) -> JSONResponse:
        # Validation refuses such text first; this catches any the checks missed.
        return error_response(422, ErrorCode.INVALID_INPUT, "the request holds text that is not valid Unicode")

    @app.exception_handler(Unauthorized)
    async def _on_unauthorized(_request: Request, exc: Unauthorized) -> JSONResponse:
        return error_response(401, ErrorCode.UNAUTHORIZED, str(exc), {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_Forbidden)
    async def _on_forbidden(_request: Request, exc: _Forbidden) -> JSONResponse:
        return error_response(403, ErrorCode.FORBIDDEN, str(exc))

    @app.exception_handler(IdempotencyMismatch)
    async def _on_idempotency(_request: Request, exc: IdempotencyMismatch) -> JSONResponse:
        return error_response(409, ErrorCode.IDEMPOTENCY_CONFLICT, str(exc))

    @app.exception_handler(QuotaExceeded)
    async def _on_quota(_request: Request, exc: QuotaExceeded) -> JSONResponse:
        return error_response(429, ErrorCode.QUOTA_EXCEEDED, str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})

    @app.exception_handler(StorageError)
    async def _on_storage(_request: Request, exc: StorageError) -> JSONResponse:
        log.warning("object storage unavailable: %s", exc)  # S3 down at admission: nothing was written
        headers = {"Retry-After": str(AdmissionUnavailable.retry_after)}
        return error_response(503, ErrorCode.UNAVAILABLE, "object storage is unavailable; no job was created, try again", headers)

    @app.exception_handler(JobNotFound)
    async def _on_not_found(_request: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(404, ErrorCode.NOT_FOUND, str(exc))

    @app.exception_handler(InvalidJobOperation)
    async def _on_invalid_operation(_request: Request, exc: InvalidJobOperation) -> JSONResponse:
        return error_response(409, ErrorCode.INVALID_OPERATION, str(exc))

    @app.exception_handler(DataError)
    async def _on_data(_request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value (validation should have first): the caller's input, not an
        # outage — a 503 here would invite retrying the same request forever.
        log.warning("database refused a value: %s", type(exc.orig).__name__)
        return error_response(422, ErrorCode.INVALID_INPUT, "the database refused a value of this request")

    @app.exception_handler(SQLAlchemyError)
    async def _on_database(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        # The driver's text can hold SQL and connection details: log the class, answer generically.
        log.error("database error: %s", type(exc).__name__)
        return error_response(503, ErrorCode.UNAVAILABLE, "the database is unavailable; try again")

    @app.exception_handler(Exception)
    async def _on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # Starlette still re-raises after answering, so the server logs the traceback; the client
        # gets the one JSON shape and no internals.
        return error_response(500, ErrorCode.INTERNAL, "internal error")

    # --- jobs (sync handlers: FastAPI runs them in its thread pool; the database calls block) ---

    job_responses: dict[int | str, dict[str, Any]] = {200: {"model": JobOut, "description": "the job"}}

    def checked(body: CreateJob, who: Caller) -> NewJob:
        """One job request validated as every route that creates jobs does (InvalidInput: refused)."""
        return validate_request(
            image=body.image,
            prompt=body.prompt,
            size=body.size,
            seed=body.seed,
            idempotency_key=body.idempotency_key,
            tenant=body.tenant or who.tenant,
            priority=body.priority,
            callback_url=body.callback_url,
            settings=settings,
            remote=True,
            resolver=url_resolver,
        )

    @app.post(
        "/jobs",
        status_code=201,
        response_model=None,
        responses={
            201: {"model": JobOut, "description": "created"},
            200: {"model": JobOut, "description": "an idempotent replay: the job this key made"},
            **_errors(401, 403, 409, 413, 422, 429, 503),
        },
    )
    def create_job(body: CreateJob, who: Caller = Depends(caller)) -> JSONResponse:
        """Create an edit job for the key's tenant (201), or answer the job an idempotency key
        already made (200)."""
        if body.tenant is not None and not who.admin and body.tenant != who.tenant:
            raise _Forbidden("only an admin key may create jobs for another tenant")
        request = checked(body, who)
        # The `created` flag tells a new job (201) from an idempotent replay (200). The input
        # image goes to S3 first.
        [(job, created)] = enqueue_pairs(
            settings, [request], publisher=get_publisher(), storage=storage, tracing=tracing, totals=fleet_totals.totals
        )
        return JSONResponse(status_code=201 if created else 200, content=view(job))

    @app.post(
        batch_path,
        status_code=201,
        response_model=None,
        responses={
            201: {"model": JobBatchOut, "description": "the jobs, in request order (created, or made earlier by the same idempotency key)"},
            200: {"model": JobBatchOut, "description": "every request was an idempotent replay: the jobs their keys made"},
            422: {
                "model": BatchErrorBody,
                "description": "invalid input: `error.items` names each refused request (index, message); nothing was written",
            },
            **_errors(401, 403, 409, 413, 429, 503),
        },
    )
    def create_jobs_batch(body: CreateJobs, who: Caller = Depends(caller)) -> JSONResponse:
        """Create 1..1000 edit jobs at once, all or nothing: every request is checked first (one
        invalid request: 422 naming each bad one by index, nothing written), the tenants' quotas
        apply to the whole batch (429), the jobs are written in one transaction and answered in
        request order. Idempotency keys work as for POST /jobs (a replay answers the earlier job;
        a key reused with another request: 409, nothing written)."""
        requests: list[NewJob] = []
        refused: list[tuple[int, str]] = []
        for index, item in enumerate(body.jobs):
            if item.tenant is not None and not who.admin and item.tenant != who.tenant:
                raise _Forbidden(f"jobs[{index}]: only an admin key may create jobs for another tenant")
            try:
                requests.append(checked(item, who))
            except InvalidInput as exc:
                refused.append((index, str(exc)))
        if refused:
            raise BatchInvalid(refused)
        # One transaction for the whole batch (batch_size = its length): all or nothing.
        pairs = enqueue_pairs(
            settings,
            requests,
            publisher=get_publisher(),
            storage=storage,
            batch_size=len(requests),
            tracing=tracing,
            totals=fleet_totals.totals,
        )
        created = any(new for _, new in pairs)
        return JSONResponse(status_code=201 if created else 200, content={"jobs": [view(job) for job, _ in pairs]})

    @app.get(
        "/jobs",
        response_model=None,
        responses={200: {"model": JobListOut, "description": "a page of jobs, newest first"}, **_errors(401, 403, 422, 503)},
    )
    def list_jobs(
        state: str | None = Query(None, description="queued|submitting|processing|uploading|succeeded|failed|cancelled"),
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, max_length=200, description="`next_cursor` of the previous page"),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="deprecated: prefer `cursor`"),
        tenant: str | None = Query(None, max_length=64, description="admin keys only: one tenant's jobs"),
        who: Caller = Depends(caller),
    ) -> dict:
        """Your tenant's jobs, newest first (an admin key: every tenant's, or one with `tenant`)."""
        wanted = None
        if state:
            try:
                wanted = State(state.strip().lower())
            except ValueError:
                raise InvalidInput(f"unknown state {state[:40]!r}; one of: {', '.join(s.value for s in State)}") from None
        page = jobs.list_page(sessions, state=wanted, limit=limit, offset=offset, after=cursor, tenant=_scope(who, tenant))
        return {"jobs": [view(job) for job in page.jobs], "next_cursor": page.next_cursor}

    @app.get("/jobs/{job_id}", response_model=None, responses={**job_responses, **_errors(401, 404, 422, 503)})
    def get_job(job_id: str, who: Caller = Depends(caller)) -> dict:
        return view(jobs.get_job(sessions, job_id, tenant=who.scope))

    @app.get(
        "/jobs/{job_id}/events",
        response_model=None,
        responses={
            200: {"model": list[EventOut], "description": "the job's state changes, oldest first"},
            **_errors(401, 404, 422, 503),
        },
    )
    def get_events(job_id: str, who: Caller = Depends(caller)) -> list[dict]:
        jobs.get_job(sessions, job_id, tenant=who.scope)  # 404 for an unknown (or another tenant's) job
        return [jobs.event_json(event) for event in jobs.job_events(sessions, job_id)]

    @app.get(
        "/jobs/{job_id}/outputs/{index}",
        status_code=307,
        response_model=None,
        responses={307: {"description": "a redirect to a fresh presigned link to the output"}, **_errors(401, 404, 422, 503)},
    )
    def get_output(job_id: str, index: int, who: Caller = Depends(caller)) -> RedirectResponse:
        """Redirect to a fresh presigned link to output `index` (0-based) of a finished job."""
        job = jobs.get_job(sessions, job_id, tenant=who.scope)
        try:
            url = nth_output_link(job, index, link_storage(), settings)
        except InvalidJobOperation as exc:
            raise JobNotFound(str(exc)) from None
        return RedirectResponse(url, status_code=307)

    @app.post("/jobs/{job_id}/cancel", response_model=None, responses={**job_responses, **_errors(401, 404, 409, 422, 503)})
    def cancel(job_id: str, who: Caller = Depends(caller)) -> dict:
        jobs.get_job(sessions, job_id, tenant=who.scope)  # 404 before building the engine's dependencies
        return view(operator.cancel_job(deps_factory(), job_id, reason="cancelled over the HTTP API"))

    @app.post("/jobs/{job_id}/retry", response_model=None, responses={**job_responses, **_errors(401, 404, 409, 422, 503)})
    def retry(job_id: str, who: Caller = Depends(caller)) -> dict:
        jobs.get_job(sessions, job_id, tenant=who.scope)
        deps = deps_factory()
        job = operator.retry_job(deps, job_id)
        _relay(deps, job_id)
        return view(job)

    @app.post(
        "/jobs/retry",
        response_model=None,
        responses={200: {"model": BulkOut, "description": "the replayed jobs"}, **_errors(401, 403, 422, 503)},
    )
    def retry_many(body: BulkFilter, who: Caller = Depends(caller)) -> dict:
        """Replay every failed job of your tenant matching the filter (admin: of every tenant)."""
        if body.state is not None:
            raise InvalidInput("state: only failed jobs are retried; leave it out")
        deps = deps_factory()
        replayed = operator.retry_matching(deps, tenant=_scope(who, body.tenant), error_code=body.error_code, since=body.since)
        _relay(deps, None)
        return {"count": len(replayed), "jobs": [job.id for job in replayed]}

    @app.post(
        "/jobs/cancel",
        response_model=None,
        responses={200: {"model": BulkOut, "description": "the cancelled jobs"}, **_errors(401, 403, 422, 503)},
    )
    def cancel_many(body: BulkFilter, who: Caller = Depends(caller)) -> dict:
        """Cancel every unfinished job of your tenant matching the filter (admin: of every tenant)."""
        wanted = None
        if body.state:
            try:
                wanted = State(body.state.strip().lower())
            except ValueError:
                raise InvalidInput(f"unknown state {body.state[:40]!r}") from None
        cancelled = operator.cancel_matching(
            deps_factory(),
            tenant=_scope(who, body.tenant),
            state=wanted,
            error_code=body.error_code,
            since=body.since,
            reason="cancelled over the HTTP API (bulk)",
        )
        return {"count": len(cancelled), "jobs": [job.id for job in cancelled]}

    def _relay(deps, job_id: str | None) -> None:
        try:
            reconciler.relay_outbox(deps)
        except Exception as exc:  # the outbox row is committed: the beat relay publishes it later
            log.warning("retry: outbox relay failed (%s); left for the beat relay", type(exc).__name__, extra={"job_id": job_id})

    # --- completion callbacks ---

    @app.get(
        "/jobs/{job_id}/deliveries",
        response_model=None,
        responses={
            200: {"model": list[DeliveryOut], "description": "the job's callback deliveries, oldest first"},
            **_errors(401, 404, 503),
        },
    )
    def get_deliveries(job_id: str, who: Caller = Depends(caller)) -> list[dict]:
        jobs.get_job(sessions, job_id, tenant=who.scope)
        return [delivery_json(d) for d in list_deliveries(sessions, job_id)]

    @app.post(
        "/jobs/{job_id}/redeliver",
        response_model=None,
        responses={200: {"model": DeliveryOut, "description": "the job's latest delivery, due again now"}, **_errors(401, 404, 409, 503)},
    )
    def redeliver_job(job_id: str, who: Caller = Depends(caller)) -> dict:
        """Send the job's latest callback again now, under the same webhook-id."""
        jobs.get_job(sessions, job_id, tenant=who.scope)
        return delivery_json(callbacks.redeliver(deps_factory(), job_id=job_id))

    @app.post(
        "/deliveries/redeliver",
        response_model=None,
        responses={200: {"description": "how many failed deliveries are due again"}, **_errors(401, 403, 422, 503)},
    )
    def redeliver_failed(body: BulkFilter, who: Caller = Depends(caller)) -> dict:
        """Bulk: send every failed callback of your tenant (admin: of every tenant, or `tenant`) again now."""
        if body.state is not None or body.error_code is not None:
            raise InvalidInput("only `since` and (admin) `tenant` filter deliveries")
        count = callbacks.redeliver_failed(deps_factory(), body.since, tenant=_scope(who, body.tenant))
        return {"redelivered": count}

    # --- tenants and keys ---

    @app.get("/usage", response_model=None, responses={200: {"model": UsageListOut, "description": "per tenant"}, **_errors(401, 403, 503)})
    def get_usage(
        tenant: str | None = Query(None, max_length=64, description="admin keys only: one tenant"), who: Caller = Depends(caller)
    ) -> dict:
        """Per tenant: jobs by state, paid jobs admitted today, paid submissions today and their cost."""
        rows = tenants.usage(sessions, settings, tenant=_scope(who, tenant))
        return {"tenants": [vars(row) for row in rows]}

    @app.get(
        "/tenants",
        response_model=None,
        responses={200: {"model": TenantListOut, "description": "tenants and their quotas"}, **_errors(401, 403, 503)},
    )
    def list_tenants(_who: Caller = Depends(admin)) -> dict:
        """Admin: every tenant with its weight, quotas (null: the deployment's default) and default callback URL."""
        return {"tenants": [_tenant_json(row) for row in tenants.list_tenants(sessions)]}

    @app.put(
        "/tenants/{name}",
        response_model=None,
        responses={200: {"model": TenantOut, "description": "the tenant"}, **_errors(401, 403, 422, 503)},
    )
    def set_tenant(name: str, body: TenantSettings, _who: Caller = Depends(admin)) -> dict:
        """Admin: create a tenant or change its weight, quotas (0: no limit) and default callback URL ("" removes it)."""
        url = body.callback_url
        checked = (
            None if url is None else (validate_callback_url(url, allow_private=settings.allow_private_urls, resolver=url_resolver) or "")
        )
        row = tenants.set_tenant(
            sessions,
            name,
            weight=body.weight,
            rate_per_minute=body.rate_per_minute,
            max_in_flight=body.max_in_flight,
            daily_budget=body.daily_budget,
            callback_url=checked,
        )
        return _tenant_json(row)

    @app.post(
        "/keys",
        status_code=201,
        response_model=None,
        responses={201: {"model": NewKeyOut, "description": "the new key"}, **_errors(401, 403, 422, 503)},
    )
    def create_key(body: NewKeyRequest, _who: Caller = Depends(admin)) -> JSONResponse:
        """Admin: a new key for a tenant (created if new). The key is shown only in this answer."""
        new = tenants.create_key(sessions, body.tenant, admin=body.admin)
        return JSONResponse(
            status_code=201,
            content={
                "id": new.key_id,
                "tenant": new.tenant,
                "admin": new.admin,
                "key": new.key.get_secret_value(),
                "webhook_secret": new.webhook_secret.get_secret_value(),
            },
        )

    @app.get(
        "/keys",
        response_model=None,
        responses={200: {"model": KeyListOut, "description": "keys, never the keys themselves"}, **_errors(401, 503)},
    )
    def list_keys(who: Caller = Depends(caller)) -> dict:
        """Your tenant's keys (an admin key: every tenant's); never the keys themselves."""
        return {"keys": [_key_json(k) for k in tenants.list_keys(sessions, tenant=who.scope)]}

    @app.delete("/keys/{key_id}", response_model=None, responses={200: {"description": "revoked"}, **_errors(401, 404, 503)})
    def revoke_key(key_id: str, who: Caller = Depends(caller)) -> dict:
        mine = {k.id for k in tenants.list_keys(sessions, tenant=who.scope)}
        if key_id not in mine or not tenants.revoke_key(sessions, key_id):
            raise JobNotFound(f"no live key {key_id[:40]}")
        return {"id": key_id, "revoked": True}

    # --- provider webhooks ---

    def remember_delivery(webhook_id: str) -> bool:
        """True the first time a (verified) webhook id is seen within the replay window."""
        return deps_factory().fleet.once(webhook_seen_name(webhook_id), webhooks.REPLAY_WINDOW_SECONDS)

    def forget_delivery(webhook_id: str) -> None:
        try:
            deps_factory().fleet.forget(webhook_seen_name(webhook_id))
        except Exception as exc:
            log.warning("webhook: could not forget a delivery (%s)", type(exc).__name__)

    @app.post(
        webhook_path,
        response_model=None,
        responses={
            200: {"model": WebhookAck, "description": "taken (or a duplicate delivery, ignored)"},
            **_errors(401, 404, 413, 422, 503),
        },
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
        },
    )
    async def wavespeed_webhook(
        # The query and headers are declared for the OpenAPI document (and the fuzzer); the
        # handler reads them from `request`, exactly as they came, like the raw body.
        request: Request,
        job_id: str | None = Query(None, description="set by this worker on submit"),
        token: str | None = Query(None, description="set by this worker on submit"),
        webhook_id: str | None = Header(None, alias="webhook-id"),
        webhook_timestamp: str | None = Header(None, alias="webhook-timestamp"),
        webhook_signature: str | None = Header(None, alias="webhook-signature"),
    ) -> JSONResponse:
        if secret is None:
            return error_response(404, ErrorCode.NOT_FOUND, "webhooks are not configured")
        body = await request.body()  # the raw bytes (the signature covers them exactly), bounded by BodyLimit
        try:
            delivery = webhooks.verify(secret, request.headers, body)
        except webhooks.WebhookVerificationError as exc:
            log.warning("webhook refused: %s", exc)
            return error_response(401, ErrorCode.UNAUTHORIZED, str(exc))
        prediction_id = webhooks.prediction_id_of(body)  # parsed only once the signature holds
        try:
            first = await run_in_threadpool(remember_delivery, delivery)
        except Exception as exc:  # no replay memory (Redis down): refuse, the provider redelivers
            log.warning("webhook: cannot check for a replay (%s)", type(exc).__name__)
            return error_response(503, ErrorCode.UNAVAILABLE, "cannot check the webhook for a replay; try again")
        if not first:
            log.info("webhook %s for prediction %s: duplicate delivery ignored", delivery, prediction_id)
            return JSONResponse({"ok": True, "duplicate": True})
        try:
            # The database work blocks: run it in the thread pool like the sync handlers.
            nudge = await run_in_threadpool(nudge_poll, sessions, get_publisher, prediction_id, wakeup=webhook_wakeup())
            outcome: NudgeOutcome | reconciler.Resolution = nudge.outcome
            job_hint = webhooks.job_from_url(secret, request.query_params)
            if outcome is NudgeOutcome.UNKNOWN_PREDICTION and job_hint:
                # The job's own URL (token checked): settles a submit whose answer never arrived,
                # once the provider confirms the prediction could be that submit's.
                outcome = await run_in_threadpool(reconciler.adopt_from_webhook, deps_factory(), job_hint, prediction_id)
        except BaseException:
            forget_delivery(delivery)  # not taken: the provider's redelivery must not count as a replay
            raise
        log.info("webhook for prediction %s: %s", prediction_id, outcome, extra={"job_id": nudge.job_id or job_hint})
        # 200 also for predictions we do not know, or the provider would redeliver forever.
        return JSONResponse({"ok": True})

    # --- operations ---

    @app.get(
        "/metrics",
        response_model=None,
        responses={
            200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401, 403, 503),
        },
    )
    def prometheus_metrics(_who: Caller = Depends(admin)) -> Response:
        payload, content_type = metrics.render()
        return Response(content=payload, media_type=content_type)

    @app.get(
        "/healthz",
        response_model=None,
        responses={200: {"model": HealthOut, "description": "the API is up; `database` says if SQL answers"}},
    )
    def healthz() -> dict:
        try:
            with get_engine(settings.database_url).connect() as conn:
                conn.execute(text("SELECT 1"))
            database = True
        except SQLAlchemyError as exc:
            log.warning("healthz: database check failed (%s)", type(exc).__name__)
            database = False
        return {"ok": True, "database": database}

    # --- the operator console (/ui: HTML pages, kept out of the OpenAPI document) ---

    console.install(app, settings=settings, sessions=sessions, deps_factory=deps_factory, link_storage=link_storage, relay=_relay)

    return app
