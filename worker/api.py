"""The HTTP API (FastAPI): create, read, list, cancel and retry jobs, the WaveSpeed webhook
receiver, Prometheus metrics and a health check. Thin over the job service, the producer and the engine's operator actions.

Every refusal answers `{"error": {"code": …, "message": …}}` and writes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Callable
from enum import Enum
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.adapters import webhooks
from worker.adapters.database import get_engine, session_factory
from worker.config import Settings, get_settings
from worker.core import jobs
from worker.core.jobs import NewJob
from worker.core.states import State
from worker.core.steps import Publisher
from worker.core.validation import ImageInput, Resolver, check_url, sniff_image, validate_prompt, validate_seed, validate_size
from worker.engine import operator, reconciler
from worker.engine.webhooks import NudgeOutcome, nudge_poll
from worker.errors import InvalidInput, InvalidJobOperation, JobNotFound
from worker.metrics import Metrics
from worker.producer import publish_new

log = logging.getLogger(__name__)


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


# --- the image rules of the HTTP API ----------------------------------------------------------

_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.IGNORECASE | re.DOTALL)
_WHITESPACE = re.compile(r"\s+")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "\\")) or value.lower().startswith("file:") or bool(re.match(r"^[A-Za-z]:[\\/]", value))


def _decode_base64_image(encoded: str, *, max_bytes: int, what: str) -> tuple[bytes, str]:
    encoded = _WHITESPACE.sub("", encoded)
    if not encoded:
        raise InvalidInput(f"{what} is empty")
    # Refuse an oversized payload before decoding it (base64 carries 3 bytes per 4 characters).
    if len(encoded) // 4 * 3 > max_bytes + 3:
        raise InvalidInput(f"{what} is about {len(encoded) // 4 * 3} bytes; the limit is {max_bytes} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None
    if not data:
        raise InvalidInput(f"{what} is empty")
    if len(data) > max_bytes:
        raise InvalidInput(f"{what} is {len(data)} bytes; the limit is {max_bytes} bytes")
    return data, sniff_image(data, what=what)


def load_api_image(value: str, *, settings: Settings, resolver: Resolver | None = None) -> ImageInput:
    """An image as the HTTP API accepts it: an http(s) URL (SSRF-guarded), a `data:image/…;base64,`
    URI or bare base64 of a PNG/JPEG/WebP. Never a server path: unlike the CLI and the Python API,
    a remote caller must not make us read (or probe for) files on this machine."""
    text_value = value.strip()
    if not text_value:
        raise InvalidInput("image is required")
    if text_value[:5].lower() == "data:":
        match = _DATA_URI.match(text_value)
        params = [p.strip().lower() for p in (match.group("params") if match else "").split(";") if p.strip()]
        if not match or not match.group("mime").lower().startswith("image/") or "base64" not in params:
            raise InvalidInput("image data URI must look like data:image/<type>;base64,<data>")
        data, mime = _decode_base64_image(match.group("data"), max_bytes=settings.max_image_bytes, what="image data")
    elif "://" in text_value:
        # resolver: DNS by default; tests inject one so they need no network.
        extra = {"resolver": resolver} if resolver is not None else {}
        url = check_url(text_value, allow_private=settings.allow_private_urls, **extra)
        return ImageInput(ref=url, payload=url)
    else:
        try:
            data, mime = _decode_base64_image(text_value, max_bytes=settings.max_image_bytes, what="image data")
        except InvalidInput:
            if _looks_like_path(text_value):
                raise InvalidInput(
                    "local file paths are not accepted over HTTP; send the image as base64 "
                    "(or a data:image/...;base64 URI) or as an http(s) URL"
                ) from None
            raise
    digest = hashlib.sha256(data).hexdigest()[:16]
    return ImageInput(ref=f"base64:{mime}:sha256={digest}", payload=f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}")


class CreateJob(BaseModel):
    # Unknown fields are refused: a typo like "sead" must not silently become a random seed.
    model_config = ConfigDict(extra="forbid")

    image: str
    prompt: str
    size: str | None = None
    seed: int | None = None
    idempotency_key: str | None = None


def validate_api_request(body: CreateJob, *, settings: Settings, resolver: Resolver | None = None) -> NewJob:
    """producer.validate_request with the API's image rules. Raises InvalidInput; writes nothing."""
    prompt = validate_prompt(body.prompt)
    size = validate_size(body.size)
    seed = validate_seed(body.seed)
    key = body.idempotency_key
    if key is not None:
        key = key.strip()
        if not key or len(key) > 255:
            raise InvalidInput("idempotency key must be 1..255 characters")
    image = load_api_image(body.image, settings=settings, resolver=resolver)
    return NewJob(image=image, prompt=prompt, size=size, seed=seed, idempotency_key=key, enable_base64_output=settings.base64_output)


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


def create_app(
    settings: Settings | None = None,
    *,
    deps_factory: Callable[[], Any] | None = None,
    publisher=None,
    url_resolver: Resolver | None = None,
) -> FastAPI:
    """The API over `settings` (default: the environment). `publisher=None` publishes to Celery;
    `deps_factory` builds the engine's Deps for cancel and retry (default: `deps.build_deps`)."""
    settings = settings or get_settings()
    sessions = session_factory(settings.database_url)
    secret = webhooks.webhook_secret(settings)
    metrics = Metrics(sessions)
    # Base64 inflates by 4/3; the rest of the JSON is small. Checked on Content-Length before parsing.
    max_body = settings.max_image_bytes * 4 // 3 + 64 * 1024

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

    # --- errors: one JSON shape for every refusal ---

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, ErrorCode.INVALID_INPUT, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 401: ErrorCode.UNAUTHORIZED}.get(
            exc.status_code, ErrorCode.HTTP_ERROR
        )
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(InvalidInput)
    async def _on_invalid(_request: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(422, ErrorCode.INVALID_INPUT, str(exc))

    @app.exception_handler(JobNotFound)
    async def _on_not_found(_request: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(404, ErrorCode.NOT_FOUND, str(exc))

    @app.exception_handler(InvalidJobOperation)
    async def _on_invalid_operation(_request: Request, exc: InvalidJobOperation) -> JSONResponse:
        return error_response(409, ErrorCode.INVALID_OPERATION, str(exc))

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

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            return error_response(413, ErrorCode.INVALID_INPUT, f"request body is {length} bytes; the limit is {max_body} bytes")
        return await call_next(request)

    # --- jobs (sync handlers: FastAPI runs them in its thread pool; the database calls block) ---

    @app.post("/jobs", status_code=201)
    def create_job(body: CreateJob) -> JSONResponse:
        request = validate_api_request(body, settings=settings, resolver=url_resolver)
        # create_jobs + publish_new is producer.enqueue for one request, keeping the `created`
        # flag that tells a new job (201) from an idempotent replay (200).
        [(job, created)] = jobs.create_jobs(sessions, [request], deadline_seconds=settings.job_deadline_seconds)
        if created:
            publish_new(settings, [job.id], publisher=get_publisher())
        return JSONResponse(status_code=201 if created else 200, content=jobs.to_json(job))

    @app.get("/jobs")
    def list_jobs(
        state: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict:
        wanted = None
        if state:
            try:
                wanted = State(state.strip().lower())
            except ValueError:
                raise InvalidInput(f"unknown state {state!r}; one of: {', '.join(s.value for s in State)}") from None
        return {"jobs": [jobs.to_json(job) for job in jobs.list_jobs(sessions, state=wanted, limit=limit, offset=offset)]}

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return jobs.to_json(jobs.get_job(sessions, job_id))

    @app.get("/jobs/{job_id}/events")
    def get_events(job_id: str) -> list[dict]:
        jobs.get_job(sessions, job_id)  # 404 for an unknown job rather than an empty list
        return [jobs.event_json(event) for event in jobs.job_events(sessions, job_id)]

    @app.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict:
        jobs.get_job(sessions, job_id)  # 404 before building the engine's dependencies
        return jobs.to_json(operator.cancel_job(deps_factory(), job_id, reason="cancelled over the HTTP API"))

    @app.post("/jobs/{job_id}/retry")
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

    @app.post("/webhooks/wavespeed")
    async def wavespeed_webhook(request: Request) -> JSONResponse:
        if secret is None:
            return error_response(404, ErrorCode.NOT_FOUND, "webhooks are not configured")
        body = await request.body()  # the raw bytes: the signature covers them exactly
        try:
            webhooks.verify(secret, request.headers, body)
        except webhooks.WebhookVerificationError as exc:
            log.warning("webhook refused: %s", exc)
            return error_response(401, ErrorCode.UNAUTHORIZED, str(exc))
        prediction_id = webhooks.prediction_id_of(body)
        # The database work blocks: run it in the thread pool like the sync handlers.
        nudge = await run_in_threadpool(nudge_poll, sessions, get_publisher, prediction_id)
        outcome: NudgeOutcome | reconciler.Resolution = nudge.outcome
        job_hint = webhooks.job_from_url(secret, request.query_params)
        if outcome is NudgeOutcome.UNKNOWN_PREDICTION and job_hint:
            # The job's own URL (token checked): settles a submit whose answer never arrived.
            outcome = await run_in_threadpool(reconciler.adopt_from_webhook, deps_factory(), job_hint, prediction_id)
        log.info("webhook for prediction %s: %s", prediction_id, outcome, extra={"job_id": nudge.job_id or job_hint})
        # 200 also for predictions we do not know, or the provider would redeliver forever.
        return JSONResponse({"ok": True})

    # --- operations ---

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        payload, content_type = metrics.render()
        return Response(content=payload, media_type=content_type)

    @app.get("/healthz")
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
