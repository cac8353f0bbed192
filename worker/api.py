"""The HTTP API (FastAPI): create, read, list, cancel and retry jobs (one at a time or by filter),
result links, API keys and tenant usage, the WaveSpeed webhook receiver, Prometheus metrics and a
health check. Thin over the job service, the producer and the engine's operator actions.

Every route but the provider's webhook and the health check needs `Authorization: Bearer <key>`
(`edit-worker keys create`); a tenant's key sees only its tenant's jobs (another tenant's job id
answers 404), an admin key sees every tenant. Every refusal answers `{"error": {"code": …,
"message": …}}` and writes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import re
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.adapters import webhooks
from worker.adapters.database import get_engine, session_factory
from worker.config import Settings, get_settings
from worker.core import jobs, tenants
from worker.core.jobs import InputStore, NewJob
from worker.core.states import State
from worker.core.steps import Publisher
from worker.core.tenants import Caller
from worker.core.validation import ImageInput, Resolver, check_url, sniff_image, validate_prompt, validate_seed, validate_size
from worker.engine import operator, reconciler
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
from worker.metrics import Metrics
from worker.producer import admit, publish_new
from worker.views import job_view, nth_output_link

log = logging.getLogger(__name__)


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


class ErrorBody(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    """Every refusal: `{"error": {"code", "message"}}`."""

    error: ErrorBody


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "No API key, or an unknown or revoked one"},
    403: {"model": Error, "description": "The key may not do this (admin only)"},
    404: {"model": Error, "description": "No such job (or another tenant's)"},
    409: {"model": Error, "description": "An idempotency key reused with another request, or the job's state forbids it"},
    422: {"model": Error, "description": "Invalid input"},
    429: {"model": Error, "description": "Over the tenant's rate or daily budget; see Retry-After"},
}


class _Forbidden(Exception):
    pass


def _scope(who: Caller, tenant: str | None) -> str | None:
    """The tenant a query is limited to: the caller's own; an admin's choice (None: all)."""
    if tenant is not None and not who.admin and tenant != who.tenant:
        raise _Forbidden("only an admin key may look at another tenant")
    return tenant if who.admin else who.tenant


def _key_json(key) -> dict:
    return {
        "id": key.id,
        "tenant": key.tenant,
        "admin": key.admin,
        "created_at": jobs.iso(key.created_at),
        "revoked_at": jobs.iso(key.revoked_at),
    }


def error_response(status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code.value, "message": message}}, headers=headers)


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

    image: str = Field(description="An http(s) URL, a data:image/...;base64 URI or bare base64 of a PNG, JPEG or WebP.")
    prompt: str = Field(description="What to change, at most 120 characters.")
    size: str | None = Field(None, description="W*H, each side 512..2048 (default 1328*1328).")
    seed: int | None = Field(None, description="-1..2147483647 (default -1: random).")
    idempotency_key: str | None = Field(
        None, description="The same key with the same request returns the same job (200); with another request: 409. Per tenant, expires."
    )
    priority: str | None = Field(None, description="high | normal | low: the order of your own queued jobs (default normal).")
    tenant: str | None = Field(None, description="Admin keys only: create the job for this tenant (default: the key's own).")


class BulkFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_code: str | None = Field(None, description="Only jobs with this error code.")
    since: datetime | None = Field(None, description="Only jobs that finished (or last changed) at or after this time (ISO 8601).")
    state: str | None = Field(None, description="Cancel only: only jobs in this unfinished state.")
    tenant: str | None = Field(None, description="Admin keys only: one tenant's jobs (default: every tenant's).")


class NewKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    admin: bool = False


def validate_api_request(body: CreateJob, *, settings: Settings, resolver: Resolver | None = None, tenant: str = "default") -> NewJob:
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
    return NewJob(
        image=image,
        prompt=prompt,
        size=size,
        seed=seed,
        idempotency_key=key,
        enable_base64_output=settings.base64_output,
        tenant=tenants.validate_tenant(tenant),
        priority=tenants.validate_priority(body.priority),
    )


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
    storage: InputStore | None = None,
) -> FastAPI:
    """The API over `settings` (default: the environment). `publisher=None` publishes to Celery;
    `deps_factory` builds the engine's Deps for cancel and retry (default: `deps.build_deps`);
    `storage` is where input images go at admission (default: S3 as `settings` say)."""
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

    @app.exception_handler(Unauthorized)
    async def _on_unauthorized(_request: Request, exc: Unauthorized) -> JSONResponse:
        response = error_response(401, ErrorCode.UNAUTHORIZED, str(exc))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(_Forbidden)
    async def _on_forbidden(_request: Request, exc: _Forbidden) -> JSONResponse:
        return error_response(403, ErrorCode.FORBIDDEN, str(exc))

    @app.exception_handler(IdempotencyMismatch)
    async def _on_idempotency(_request: Request, exc: IdempotencyMismatch) -> JSONResponse:
        return error_response(409, ErrorCode.IDEMPOTENCY_CONFLICT, str(exc))

    @app.exception_handler(QuotaExceeded)
    async def _on_quota(_request: Request, exc: QuotaExceeded) -> JSONResponse:
        response = error_response(429, ErrorCode.QUOTA_EXCEEDED, str(exc))
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response

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

    @app.exception_handler(StorageError)
    async def _on_storage(_request: Request, exc: StorageError) -> JSONResponse:
        log.warning("object storage unavailable: %s", exc)  # S3 down at admission: nothing was written
        headers = {"Retry-After": str(AdmissionUnavailable.retry_after)}
        return error_response(503, ErrorCode.UNAVAILABLE, "object storage is unavailable; no job was created, try again", headers)

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

    @app.post("/jobs", status_code=201, responses=_ERRORS)
    def create_job(body: CreateJob, who: Caller = Depends(caller)) -> JSONResponse:
        """Create an edit job for the key's tenant (201), or answer the job an idempotency key
        already made (200)."""
        if body.tenant is not None and not who.admin and body.tenant != who.tenant:
            raise _Forbidden("only an admin key may create jobs for another tenant")
        tenant = body.tenant or who.tenant
        request = validate_api_request(body, settings=settings, resolver=url_resolver, tenant=tenant)
        # admit + publish_new is producer.enqueue for one request, keeping the `created` flag that
        # tells a new job (201) from an idempotent replay (200). The input image goes to S3 first.
        tenants.check_admission(sessions, request.tenant, 1, settings)
        [(job, created)] = admit(settings, [request], storage=storage)
        if created:
            publish_new(settings, [job.id], publisher=get_publisher())
        return JSONResponse(status_code=201 if created else 200, content=view(job))

    @app.get("/jobs", responses=_ERRORS)
    def list_jobs(
        state: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=1_000_000),
        tenant: str | None = Query(None, description="Admin keys only: one tenant's jobs."),
        who: Caller = Depends(caller),
    ) -> dict:
        """Your tenant's jobs, newest first (an admin key: every tenant's, or one with `tenant`)."""
        wanted = None
        if state:
            try:
                wanted = State(state.strip().lower())
            except ValueError:
                raise InvalidInput(f"unknown state {state!r}; one of: {', '.join(s.value for s in State)}") from None
        scope = _scope(who, tenant)
        return {"jobs": [view(job) for job in jobs.list_jobs(sessions, state=wanted, limit=limit, offset=offset, tenant=scope)]}

    @app.get("/jobs/{job_id}", responses=_ERRORS)
    def get_job(job_id: str, who: Caller = Depends(caller)) -> dict:
        return view(jobs.get_job(sessions, job_id, tenant=who.scope))

    @app.get("/jobs/{job_id}/events", responses=_ERRORS)
    def get_events(job_id: str, who: Caller = Depends(caller)) -> list[dict]:
        jobs.get_job(sessions, job_id, tenant=who.scope)  # 404 for an unknown (or another tenant's) job
        return [jobs.event_json(event) for event in jobs.job_events(sessions, job_id)]

    @app.get("/jobs/{job_id}/outputs/{index}", status_code=307, responses={307: {"description": "A fresh presigned link"}, **_ERRORS})
    def get_output(job_id: str, index: int, who: Caller = Depends(caller)) -> RedirectResponse:
        """Redirect to a fresh presigned link to output `index` (0-based) of a finished job."""
        job = jobs.get_job(sessions, job_id, tenant=who.scope)
        try:
            url = nth_output_link(job, index, link_storage(), settings)
        except InvalidJobOperation as exc:
            raise JobNotFound(str(exc)) from None
        return RedirectResponse(url, status_code=307)

    @app.post("/jobs/{job_id}/cancel", responses=_ERRORS)
    def cancel(job_id: str, who: Caller = Depends(caller)) -> dict:
        jobs.get_job(sessions, job_id, tenant=who.scope)  # 404 before building the engine's dependencies
        return view(operator.cancel_job(deps_factory(), job_id, reason="cancelled over the HTTP API"))

    @app.post("/jobs/{job_id}/retry", responses=_ERRORS)
    def retry(job_id: str, who: Caller = Depends(caller)) -> dict:
        jobs.get_job(sessions, job_id, tenant=who.scope)
        deps = deps_factory()
        job = operator.retry_job(deps, job_id)
        _relay(deps, job_id)
        return view(job)

    @app.post("/jobs/retry", responses=_ERRORS)
    def retry_many(body: BulkFilter, who: Caller = Depends(caller)) -> dict:
        """Replay every failed job of your tenant matching the filter (admin: of every tenant)."""
        if body.state is not None:
            raise InvalidInput("state: only failed jobs are retried; leave it out")
        deps = deps_factory()
        replayed = operator.retry_matching(deps, tenant=_scope(who, body.tenant), error_code=body.error_code, since=body.since)
        _relay(deps, None)
        return {"count": len(replayed), "jobs": [job.id for job in replayed]}

    @app.post("/jobs/cancel", responses=_ERRORS)
    def cancel_many(body: BulkFilter, who: Caller = Depends(caller)) -> dict:
        """Cancel every unfinished job of your tenant matching the filter (admin: of every tenant)."""
        wanted = None
        if body.state:
            try:
                wanted = State(body.state.strip().lower())
            except ValueError:
                raise InvalidInput(f"unknown state {body.state!r}") from None
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

    # --- tenants and keys ---

    @app.get("/usage", responses=_ERRORS)
    def get_usage(tenant: str | None = Query(None, description="Admin keys only: one tenant."), who: Caller = Depends(caller)) -> dict:
        """Per tenant: jobs by state, paid jobs admitted today, paid submissions today and their cost."""
        rows = tenants.usage(sessions, settings, tenant=_scope(who, tenant))
        return {"tenants": [vars(row) for row in rows]}

    @app.post("/keys", status_code=201, responses=_ERRORS)
    def create_key(body: NewKeyRequest, _who: Caller = Depends(admin)) -> dict:
        """Admin: a new key for a tenant (created if new). The key is shown only in this answer."""
        new = tenants.create_key(sessions, body.tenant, admin=body.admin)
        return {
            "id": new.key_id,
            "tenant": new.tenant,
            "admin": new.admin,
            "key": new.key.get_secret_value(),
            "webhook_secret": new.webhook_secret.get_secret_value(),
        }

    @app.get("/keys", responses=_ERRORS)
    def list_keys(who: Caller = Depends(caller)) -> dict:
        """Your tenant's keys (an admin key: every tenant's); never the keys themselves."""
        return {"keys": [_key_json(k) for k in tenants.list_keys(sessions, tenant=who.scope)]}

    @app.delete("/keys/{key_id}", responses=_ERRORS)
    def revoke_key(key_id: str, who: Caller = Depends(caller)) -> dict:
        mine = {k.id for k in tenants.list_keys(sessions, tenant=who.scope)}
        if key_id not in mine or not tenants.revoke_key(sessions, key_id):
            raise JobNotFound(f"no live key {key_id}")
        return {"id": key_id, "revoked": True}

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

    @app.get("/metrics", responses=_ERRORS)
    def prometheus_metrics(_who: Caller = Depends(admin)) -> Response:
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
