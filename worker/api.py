"""The HTTP API (FastAPI): create, read, list, cancel and retry jobs, the WaveSpeed webhook
receiver, Prometheus metrics and a health check. Thin over the job service, the producer and the engine's operator actions.

Every refusal answers `{"error": {"code": …, "message": …}}` and writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.adapters import webhooks
from worker.adapters.database import get_engine, session_factory
from worker.adapters.redis_keys import webhook_seen_name
from worker.config import Settings, get_settings
from worker.core import jobs
from worker.core.states import State
from worker.core.steps import Publisher
from worker.core.validation import Resolver, validate_request
from worker.engine import operator, reconciler
from worker.engine.webhooks import nudge_poll
from worker.errors import InvalidInput, InvalidJobOperation, JobNotFound
from worker.metrics import Metrics
from worker.producer import publish_new

log = logging.getLogger(__name__)

# `offset` paging reads and drops every skipped row; `cursor` paging does not. Deep offsets are refused.
MAX_OFFSET = 10_000


class ErrorCode(str, Enum):
    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    INVALID_OPERATION = "invalid_operation"
    UNAUTHORIZED = "unauthorized"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    HTTP_ERROR = "http_error"


def error_response(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code.value, "message": message}})


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
    idempotency_key: str | None = Field(None, description="1..255 characters; the same key answers the same job")


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
        401: "not signed with our webhook secret",
        404: "no such job (or webhooks are not configured)",
        409: "the operation does not apply to the job's state",
        413: "the request body is over the limit",
        422: "invalid input",
        503: "the database (or Redis) is unavailable; try again",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


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
) -> FastAPI:
    """The API over `settings` (default: the environment). `publisher=None` publishes to Celery;
    `deps_factory` builds the engine's Deps for cancel, retry and webhooks (default: `deps.build_deps`)."""
    settings = settings or get_settings()
    sessions = session_factory(settings.database_url)
    secret = webhooks.webhook_secret(settings)
    metrics = Metrics(sessions, cache_seconds=settings.metrics_cache_seconds)
    # Base64 inflates by 4/3; the rest of the JSON is small. A webhook only has to name its
    # prediction: one too large to take (base64 outputs) is refused, and the poll finds the result.
    max_body = settings.max_image_bytes * 4 // 3 + 64 * 1024
    webhook_path = "/webhooks/wavespeed"

    def body_limit(path: str) -> int:
        return settings.webhook_max_bytes if path == webhook_path else max_body

    if deps_factory is None:

        def deps_factory():
            from worker.engine.deps import build_deps

            return build_deps(settings, publisher)

    def get_publisher():
        return publisher if publisher is not None else _celery_publisher()

    app = FastAPI(
        title="edit-worker", version="0.1.0", description="Durable WaveSpeed Dreamina V3.0 Edit jobs: submit, status, cancel, retry."
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit_for=body_limit)

    # --- errors: one JSON shape for every refusal ---

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, ErrorCode.INVALID_INPUT, _validation_message(exc))

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

    @app.post(
        "/jobs",
        status_code=201,
        response_model=None,
        responses={
            201: {"model": JobOut, "description": "created"},
            200: {"model": JobOut, "description": "an idempotent replay: the job this key made"},
            **_errors(413, 422, 503),
        },
    )
    def create_job(body: CreateJob) -> JSONResponse:
        request = validate_request(
            image=body.image,
            prompt=body.prompt,
            size=body.size,
            seed=body.seed,
            idempotency_key=body.idempotency_key,
            settings=settings,
            remote=True,
            resolver=url_resolver,
        )
        # create_jobs + publish_new is producer.enqueue for one request, keeping the `created`
        # flag that tells a new job (201) from an idempotent replay (200).
        [(job, created)] = jobs.create_jobs(sessions, [request], deadline_seconds=settings.job_deadline_seconds)
        if created:
            publish_new(settings, [job.id], publisher=get_publisher())
        return JSONResponse(status_code=201 if created else 200, content=jobs.to_json(job))

    @app.get(
        "/jobs",
        response_model=None,
        responses={200: {"model": JobListOut, "description": "a page of jobs, newest first"}, **_errors(422, 503)},
    )
    def list_jobs(
        state: str | None = Query(None, description="queued|submitting|processing|uploading|succeeded|failed|cancelled"),
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, max_length=200, description="`next_cursor` of the previous page"),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="deprecated: prefer `cursor`"),
    ) -> dict:
        wanted = None
        if state:
            try:
                wanted = State(state.strip().lower())
            except ValueError:
                raise InvalidInput(f"unknown state {state[:40]!r}; one of: {', '.join(s.value for s in State)}") from None
        page = jobs.list_page(sessions, state=wanted, limit=limit, offset=offset, after=cursor)
        return {"jobs": [jobs.to_json(job) for job in page.jobs], "next_cursor": page.next_cursor}

    @app.get("/jobs/{job_id}", response_model=None, responses={**job_responses, **_errors(404, 422, 503)})
    def get_job(job_id: str) -> dict:
        return jobs.to_json(jobs.get_job(sessions, job_id))

    @app.get(
        "/jobs/{job_id}/events",
        response_model=None,
        responses={200: {"model": list[EventOut], "description": "the job's state changes, oldest first"}, **_errors(404, 422, 503)},
    )
    def get_events(job_id: str) -> list[dict]:
        jobs.get_job(sessions, job_id)  # 404 for an unknown job rather than an empty list
        return [jobs.event_json(event) for event in jobs.job_events(sessions, job_id)]

    @app.post("/jobs/{job_id}/cancel", response_model=None, responses={**job_responses, **_errors(404, 409, 422, 503)})
    def cancel(job_id: str) -> dict:
        jobs.get_job(sessions, job_id)  # 404 before building the engine's dependencies
        return jobs.to_json(operator.cancel_job(deps_factory(), job_id, reason="cancelled over the HTTP API"))

    @app.post("/jobs/{job_id}/retry", response_model=None, responses={**job_responses, **_errors(404, 409, 422, 503)})
    def retry(job_id: str) -> dict:
        jobs.get_job(sessions, job_id)
        deps = deps_factory()
        job = operator.retry_job(deps, job_id)
        try:
            reconciler.relay_outbox(deps)
        except Exception as exc:  # the outbox row is committed: the beat relay publishes it later
            log.warning("retry: outbox relay failed (%s); left for the beat relay", type(exc).__name__, extra={"job_id": job_id})
        return jobs.to_json(job)

    # --- provider webhooks ---

    def remember_delivery(webhook_id: str) -> bool:
        """True the first time a (verified) webhook id is seen within the replay window."""
        return deps_factory().limits.once(webhook_seen_name(webhook_id), webhooks.REPLAY_WINDOW_SECONDS)

    def forget_delivery(webhook_id: str) -> None:
        try:
            deps_factory().limits.forget(webhook_seen_name(webhook_id))
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
            nudge = await run_in_threadpool(nudge_poll, sessions, get_publisher, prediction_id)
            outcome = nudge.outcome
            job_hint = webhooks.job_from_url(secret, request.query_params)
            if outcome == "unknown_prediction" and job_hint:
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
        responses={200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def prometheus_metrics() -> Response:
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

    return app
