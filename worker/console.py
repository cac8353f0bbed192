"""The operator console: server-rendered pages at `/ui` (jobs with filters and live counts, one
job's whole story, bulk actions, settling parked submits, health, charts), over the same job
service, operator actions and adapters as the HTTP API — no second copy of any of them.

Log in with an API key (`edit-worker keys create`): it is kept in an HttpOnly, SameSite=Strict
cookie (Secure over https; plain http only on a loopback host) and never rendered or logged. A
tenant's key sees only its tenant's jobs (another tenant's job answers 404); an admin key sees every
tenant. Every POST carries a CSRF token derived from the session's key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.staticfiles import StaticFiles

from worker.config import Settings
from worker.core import jobs, stats, tenants
from worker.core.codes import ErrorCode
from worker.core.deliveries import delivery_json, list_deliveries
from worker.core.jobs import JobFilter
from worker.core.states import ACTIVE, State
from worker.core.tenants import Caller
from worker.engine import callbacks, operator, reconciler
from worker.errors import EditWorkerError, InvalidInput, InvalidJobOperation, JobNotFound, ProviderError
from worker.views import job_view, nth_output_link

log = logging.getLogger(__name__)

PREFIX = "/ui"
SESSION_COOKIE = "ew_console"
LOGIN_COOKIE = "ew_console_login"
CSRF_LABEL = b"edit-worker console csrf v1"
PAGE_SIZE = 50
# A worker that has not beaten for this long is not "seen recently" (it beats every 10 s).
WORKERS_SEEN_SECONDS = 60.0
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
SINCE = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
NOTICES = {
    "cancelled": "Job cancelled.",
    "retried": "Job replayed: it runs again from the furthest step already paid for.",
    "redelivered": "Callback due again now (same webhook-id).",
    "adopted": "Settled: the job adopted the provider task and is being polled.",
    "resubmitted": "Settled: the job goes back to the queue and is submitted again.",
    "settled": "Settled.",
    "bulk-retry": "Failed jobs replayed.",
    "bulk-cancel": "Unfinished jobs cancelled.",
}
HERE = Path(__file__).parent
TEMPLATES = HERE / "templates" / "console"
STATIC = HERE / "static" / "console"

# The console's pages load nothing from elsewhere but images (presigned S3 links, provider outputs).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: http: https:; script-src 'self'; style-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def csrf_token(key: str) -> str:
    """The CSRF token of a session: an HMAC keyed by the session's API key (which only the cookie
    holds, HttpOnly), so a page elsewhere can neither read nor compute it; the same in every API
    process."""
    return hmac.new(key.encode("utf-8", "surrogatepass"), CSRF_LABEL, hashlib.sha256).hexdigest()


class NeedsLogin(Exception):
    pass


class ConsoleError(Exception):
    """A refusal shown as a page: `status` and one line of text."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Session_:
    who: Caller
    csrf: str


def _utc(text: str, name: str) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{name}: not a date and time ({text[:40]!r}); use YYYY-MM-DDTHH:MM (UTC)") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _text(params: dict[str, str], name: str, limit: int) -> str:
    value = params.get(name, "").strip()
    if len(value) > limit:
        raise InvalidInput(f"{name}: at most {limit} characters")
    if not value.isprintable():
        raise InvalidInput(f"{name}: holds characters that cannot be searched for")
    return value


FILTER_FIELDS = ("state", "tenant", "error_code", "created_from", "created_to", "since", "q")


def parse_filter(params: dict[str, str], who: Caller, now: datetime) -> tuple[JobFilter, dict[str, str]]:
    """The jobs page's query (or a bulk form's fields) as a JobFilter limited to what `who` may
    see, and the cleaned fields to carry on in links. Bad input raises InvalidInput."""
    fields = {name: _text(params, name, 200 if name == "q" else 64) for name in FILTER_FIELDS}
    states: tuple[State, ...] = ()
    if fields["state"]:
        try:
            states = (State(fields["state"].lower()),)
        except ValueError:
            raise InvalidInput(f"state: unknown state {fields['state'][:40]!r}") from None
    tenant = fields["tenant"] or None
    if tenant is not None and not who.admin and tenant != who.tenant:
        raise ConsoleError(403, "only an admin key may look at another tenant")
    created_from = _utc(fields["created_from"], "created from")
    created_to = _utc(fields["created_to"], "created to")
    if created_from and created_to and created_from >= created_to:
        raise InvalidInput("created from must be before created to")
    since = None
    if fields["since"]:
        if fields["since"] not in SINCE:
            raise InvalidInput(f"since: one of {', '.join(SINCE)}")
        since = now - SINCE[fields["since"]]
    flt = JobFilter(
        states=states,
        tenant=tenant if who.admin else who.tenant,
        error_code=fields["error_code"] or None,
        created_from=created_from,
        created_to=created_to,
        since=since,
        text=fields["q"] or None,
    )
    return flt, {k: v for k, v in fields.items() if v}


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "—"
    seconds = max(0, int((now - jobs.as_utc(value)).total_seconds()))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 5400:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


# --- server-rendered SVG charts ----------------------------------------------------------------

COLORS = {"succeeded": "#2e7d32", "failed": "#c62828", "cancelled": "#757575", "p50": "#1565c0", "p90": "#ef6c00", "p99": "#6a1b9a"}


def _labels(start: datetime, window: stats.Window) -> list[str]:
    width = timedelta(seconds=window.bucket_seconds)
    fmt = "%H:%M" if window is not stats.Window.WEEK else "%a %H:%M"
    return [(start + width * i).strftime(fmt) for i in range(window.buckets)]


def stacked_bars(series: dict[str, list[int]], labels: list[str], *, title: str, width: int = 720, height: int = 220) -> Markup:
    """Columns per bucket, one colour per series stacked (throughput by terminal state)."""
    n = len(labels)
    totals = [sum(values[i] for values in series.values()) for i in range(n)]
    top = max(totals + [1])
    left, bottom, plot_h = 40, 30, height - 50
    step = (width - left - 10) / max(n, 1)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}"><title>{escape(title)}</title>'
    ]
    parts.append(f'<text x="{left}" y="12" class="axis">max {top}/bucket</text>')
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" class="axisline"/>')
    for i in range(n):
        y = float(height - bottom)
        for name, values in series.items():
            if values[i] <= 0:
                continue
            h = values[i] / top * plot_h
            y -= h
            parts.append(
                f'<rect x="{left + i * step + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" height="{h:.1f}" fill="{COLORS.get(name, "#999")}">'
                f"<title>{escape(labels[i])} {escape(name)}: {values[i]}</title></rect>"
            )
        if n <= 12 or i % max(1, n // 7) == 0:
            parts.append(f'<text x="{left + i * step:.1f}" y="{height - 12}" class="axis">{escape(labels[i])}</text>')
    parts.append(_legend(list(series), width))
    parts.append("</svg>")
    return Markup("".join(parts))


def percentile_lines(
    points: list[tuple[float, float, float] | None], labels: list[str], *, title: str, width: int = 720, height: int = 220
) -> Markup:
    """p50 / p90 / p99 lines per bucket (a gap where no job finished)."""
    n = len(labels)
    top = max([p[2] for p in points if p] + [1.0])
    left, bottom, plot_h = 40, 30, height - 50
    step = (width - left - 10) / max(n, 1)  # the bars' columns: a point sits in its column's middle
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}"><title>{escape(title)}</title>'
    ]
    parts.append(f'<text x="{left}" y="12" class="axis">max {escape(_seconds(top))}</text>')
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" class="axisline"/>')
    for k, name in enumerate(("p50", "p90", "p99")):
        segment: list[str] = []
        segments: list[list[str]] = []
        for i, point in enumerate(points):
            if point is None:
                if segment:
                    segments.append(segment)
                segment = []
                continue
            x, y = left + (i + 0.5) * step, height - bottom - point[k] / top * plot_h
            segment.append(f"{x:.1f},{y:.1f}")
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{COLORS[name]}"><title>{escape(labels[i])} {name}: {escape(_seconds(point[k]))}</title></circle>'
            )
        if segment:
            segments.append(segment)
        for seg in segments:
            if len(seg) > 1:
                parts.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{COLORS[name]}" stroke-width="1.5"/>')
    for i in range(n):
        if n <= 12 or i % max(1, n // 7) == 0:
            parts.append(f'<text x="{left + i * step:.1f}" y="{height - 12}" class="axis">{escape(labels[i])}</text>')
    parts.append(_legend(["p50", "p90", "p99"], width))
    parts.append("</svg>")
    return Markup("".join(parts))


def horizontal_bars(rows: list[tuple[str, float]], *, title: str, fmt: Callable[[float], str] = str, width: int = 720) -> Markup:
    """One labelled bar per row (error codes, cost per tenant)."""
    if not rows:
        return Markup('<p class="muted">Nothing in this window.</p>')
    height = 22 * len(rows) + 10
    top = max([value for _, value in rows] + [1e-9])
    label_w = 240
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}"><title>{escape(title)}</title>'
    ]
    for i, (label, value) in enumerate(rows):
        y = 5 + i * 22
        w = value / top * (width - label_w - 90)
        parts.append(f'<text x="0" y="{y + 14}" class="axis">{escape(label[:36])}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{max(w, 1):.1f}" height="16" fill="#c62828"><title>{escape(label)}: {escape(fmt(value))}</title></rect>'
        )
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 13}" class="axis">{escape(fmt(value))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _legend(names: list[str], width: int) -> str:
    out = []
    for i, name in enumerate(names):
        x = width - 110 * (len(names) - i)
        out.append(
            f'<rect x="{x}" y="2" width="10" height="10" fill="{COLORS.get(name, "#999")}"/><text x="{x + 14}" y="11" class="axis">{escape(name)}</text>'
        )
    return "".join(out)


# --- the router ---------------------------------------------------------------------------------


def install(
    app: FastAPI,
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    deps_factory: Callable[[], Any],
    link_storage: Callable[[], Any],
    relay: Callable[[Any, str | None], None],
    clock: Callable[[], datetime] | None = None,
) -> None:
    """Add the console to `app`: its pages under /ui (kept out of the OpenAPI document) and its
    static files under /ui/static."""
    app.include_router(
        make_router(settings=settings, sessions=sessions, deps_factory=deps_factory, link_storage=link_storage, relay=relay, clock=clock)
    )
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="console-static")


def make_router(
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    deps_factory: Callable[[], Any],
    link_storage: Callable[[], Any],
    relay: Callable[[Any, str | None], None],
    clock: Callable[[], datetime] | None = None,
) -> APIRouter:
    """The console's routes. `clock`: the time the pages go by (default: the engine's, `deps.clock`)."""

    def now() -> datetime:
        return clock() if clock is not None else deps_factory().clock()

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["ago"] = lambda value: _ago(value, now())
    env.filters["iso"] = jobs.iso
    env.filters["seconds"] = _seconds
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def page(name: str, request: Request, code: int = 200, *, session: Session_ | None = None, **context: Any) -> HTMLResponse:
        body = env.get_template(name).render(
            request=request,
            who=session.who if session else None,
            csrf=session.csrf if session else "",
            states=[s.value for s in State],
            prefix=PREFIX,
            **context,
        )
        return HTMLResponse(body, status_code=code, headers=SECURITY_HEADERS)

    def failure(request: Request, status: int, message: str, session: Session_ | None = None) -> HTMLResponse:
        return page("error.html", request, status, session=session, status=status, message=message)

    def current(request: Request) -> Session_ | None:
        key = request.cookies.get(SESSION_COOKIE)
        if not key or len(key) > 200:
            return None
        who = tenants.authenticate(sessions, key)
        return Session_(who, csrf_token(key)) if who is not None else None

    def guarded(request: Request, run: Callable[[Session_], Response], *, form: dict[str, str] | None = None) -> Response:
        """Log-in check, CSRF check (for a POST), and every refusal as a page, never a 5xx."""
        session = current(request)
        if session is None:
            if form is not None:
                return failure(request, 401, "your session has ended: log in again")
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", status_code=303)
        if form is not None and not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            return failure(request, 403, "the form's CSRF token is missing or wrong: reload the page and try again", session)
        try:
            return run(session)
        except JobNotFound as exc:
            return failure(request, 404, str(exc), session)
        except ConsoleError as exc:
            return failure(request, exc.status, exc.message, session)
        except InvalidJobOperation as exc:
            return failure(request, 409, str(exc), session)
        except InvalidInput as exc:
            return failure(request, 422, str(exc), session)
        except ProviderError as exc:
            return failure(request, 502, f"the provider did not answer: {type(exc).__name__}", session)
        except (EditWorkerError, SQLAlchemyError) as exc:
            log.warning("console: %s", type(exc).__name__)
            return failure(request, 503, "a service the worker needs is unavailable; try again", session)

    async def read_form(request: Request) -> dict[str, str]:
        """An urlencoded form body (the console's forms post nothing else); the last value of a
        repeated field wins."""
        raw = await request.body()
        try:
            return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=50))
        except (UnicodeDecodeError, ValueError):
            return {"__invalid__": "1"}

    def query(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.query_params.items()}

    def back(path: str, **params: str) -> RedirectResponse:
        clean = {k: v for k, v in params.items() if v}
        return RedirectResponse(f"{PREFIX}{path}" + (f"?{urlencode(clean)}" if clean else ""), status_code=303)

    def session_cookie_ok(request: Request) -> str | None:
        """Why a session cookie cannot be set over this connection (None: it can)."""
        if request.url.scheme == "https" or (request.url.hostname or "") in LOOPBACK:
            return None
        return "the console sends an API key: open it over https (plain http only on 127.0.0.1)"

    # --- log in / out ---

    @router.get("", response_class=HTMLResponse)
    @router.get("/", response_class=HTMLResponse)
    def home() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/jobs", status_code=303)

    def login_page(request: Request, status: int = 200, error: str | None = None) -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        nxt = request.query_params.get("next", "")
        response = page("login.html", request, status, login_csrf=token, next=nxt if _safe_next(nxt) else "", error=error)
        response.set_cookie(
            LOGIN_COOKIE, token, max_age=1800, path=PREFIX, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        return login_page(request)

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        form = await read_form(request)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(form.get("csrf", ""), expected):
            return login_page(request, 403, "the login form expired: try again")
        refused = session_cookie_ok(request)
        if refused:
            return login_page(request, 400, refused)
        key = form.get("key", "").strip()
        who = tenants.authenticate(sessions, key) if 0 < len(key) <= 200 else None
        if who is None:
            log.info("console: login refused (unknown or revoked key)")
            return login_page(request, 401, "that API key is unknown or revoked")
        nxt = form.get("next", "")
        response = RedirectResponse(nxt if _safe_next(nxt) else f"{PREFIX}/jobs", status_code=303)
        response.set_cookie(SESSION_COOKIE, key, path=PREFIX, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        log.info("console: login", extra={"tenant": who.tenant})
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await read_form(request)

        def run(_session: Session_) -> Response:
            response = RedirectResponse(f"{PREFIX}/login", status_code=303)
            response.delete_cookie(SESSION_COOKIE, path=PREFIX)
            return response

        return guarded(request, run, form=form)

    # --- jobs ---

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request) -> Response:
        def run(session: Session_) -> Response:
            params = query(request)
            flt, fields = parse_filter(params, session.who, now())
            cursor = params.get("cursor") or None
            if cursor and len(cursor) > 200:
                raise InvalidInput("cursor is not one this console gave out")
            result = jobs.filtered_page(sessions, flt, limit=PAGE_SIZE, after=cursor)
            counts = jobs.count_by_state(sessions, flt)
            done = params.get("done", "")
            return page(
                "jobs.html",
                request,
                session=session,
                jobs=result.jobs,
                next_link=f"{PREFIX}/jobs?{urlencode({**fields, 'cursor': result.next_cursor})}" if result.next_cursor else None,
                first_link=f"{PREFIX}/jobs?{urlencode(fields)}" if cursor else None,
                fields=fields,
                filter_query=urlencode(fields),
                counts=counts,
                total=sum(counts.values()),
                error_codes=[c.value for c in ErrorCode],
                notice=_notice(done, params.get("n", "")),
            )

        return guarded(request, run)

    @router.get("/api/counts")
    def counts_json(request: Request) -> Response:
        session = current(request)
        if session is None:
            return JSONResponse({"error": {"code": "unauthorized", "message": "log in first"}}, status_code=401)
        try:
            flt, _ = parse_filter(query(request), session.who, now())
        except InvalidInput as exc:
            return JSONResponse({"error": {"code": "invalid_input", "message": str(exc)}}, status_code=422)
        except ConsoleError as exc:
            return JSONResponse({"error": {"code": "forbidden", "message": exc.message}}, status_code=exc.status)
        counts = jobs.count_by_state(sessions, flt)
        return JSONResponse(
            {"counts": {s.value: counts.get(s.value, 0) for s in State}, "total": sum(counts.values())},
            headers={"Cache-Control": "no-store"},
        )

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: str) -> Response:
        def run(session: Session_) -> Response:
            job = jobs.get_job(sessions, job_id, tenant=session.who.scope)
            events = jobs.job_events(sessions, job_id)
            deliveries = [delivery_json(d) for d in list_deliveries(sessions, job_id)]
            view = job_view(job, settings, _storage(link_storage))
            parked = job.state == State.SUBMITTING.value and not job.prediction_id
            candidates: list[Any] = []
            candidates_error = None
            if parked:
                try:
                    candidates = reconciler.candidates(deps_factory(), job_id)
                except ProviderError as exc:
                    candidates_error = f"the provider's task list is unavailable ({type(exc).__name__}); try again"
                except InvalidJobOperation:
                    parked = False  # it moved on meanwhile
            params = query(request)
            return page(
                "job.html",
                request,
                session=session,
                job=job,
                view=view,
                raw=json.dumps(view, indent=2, sort_keys=True),
                events=events,
                deliveries=deliveries,
                active=State(job.state) in ACTIVE,
                parked=parked,
                needs_operator=job.error_code == ErrorCode.NEEDS_OPERATOR.value,
                candidates=candidates,
                candidates_error=candidates_error,
                input_image=job.image_uri is not None and job.image_uri.startswith("s3://"),
                input_url=job.image_uri if job.image_uri and job.image_uri.startswith(("http://", "https://")) else None,
                notice=_notice(params.get("done", ""), ""),
            )

        return guarded(request, run)

    @router.get("/jobs/{job_id}/outputs/{index}")
    def output(request: Request, job_id: str, index: str) -> Response:
        def run(session: Session_) -> Response:
            if not index.isdigit() or len(index) > 4:
                raise JobNotFound(f"job {job_id} has no output {index[:10]!r}")
            job = jobs.get_job(sessions, job_id, tenant=session.who.scope)
            try:
                url = nth_output_link(job, int(index), _signer(link_storage), settings)
            except InvalidJobOperation as exc:
                raise JobNotFound(str(exc)) from None
            return RedirectResponse(url, status_code=307, headers={"Referrer-Policy": "no-referrer"})

        return guarded(request, run)

    @router.get("/jobs/{job_id}/input")
    def input_image(request: Request, job_id: str) -> Response:
        def run(session: Session_) -> Response:
            job = jobs.get_job(sessions, job_id, tenant=session.who.scope)
            if not job.image_uri or not job.image_uri.startswith("s3://"):
                raise JobNotFound(f"job {job_id} has no stored input image")
            url = _signer(link_storage).link(job.image_uri, settings.result_link_seconds)
            return RedirectResponse(url, status_code=307, headers={"Referrer-Policy": "no-referrer"})

        return guarded(request, run)

    # --- actions on one job ---

    def job_action(request: Request, job_id: str, form: dict[str, str], act: Callable[[Session_, Any], str]) -> Response:
        def run(session: Session_) -> Response:
            jobs.get_job(sessions, job_id, tenant=session.who.scope)  # 404 for another tenant's job
            done = act(session, deps_factory())
            return back(f"/jobs/{job_id}", done=done)

        return guarded(request, run, form=form)

    @router.post("/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str) -> Response:
        form = await read_form(request)

        def act(session: Session_, deps: Any) -> str:
            operator.cancel_job(deps, job_id, reason=f"cancelled in the console ({_actor(session)})")
            return "cancelled"

        return job_action(request, job_id, form, act)

    @router.post("/jobs/{job_id}/retry")
    async def retry(request: Request, job_id: str) -> Response:
        form = await read_form(request)

        def act(_session: Session_, deps: Any) -> str:
            operator.retry_job(deps, job_id)
            relay(deps, job_id)
            return "retried"

        return job_action(request, job_id, form, act)

    @router.post("/jobs/{job_id}/redeliver")
    async def redeliver(request: Request, job_id: str) -> Response:
        form = await read_form(request)

        def act(_session: Session_, deps: Any) -> str:
            callbacks.redeliver(deps, job_id=job_id)
            return "redelivered"

        return job_action(request, job_id, form, act)

    @router.post("/jobs/{job_id}/settle")
    async def settle(request: Request, job_id: str) -> Response:
        form = await read_form(request)

        def act(_session: Session_, deps: Any) -> str:
            adopt = form.get("adopt", "").strip()
            resubmit = form.get("resubmit", "") == "1"
            if bool(adopt) == resubmit:
                raise InvalidInput("choose one provider task to adopt, or resubmit")
            if adopt and (len(adopt) > 128 or not adopt.isprintable()):
                raise InvalidInput("that is not a provider task id")
            outcome = reconciler.resolve_by_operator(deps, job_id, adopt=adopt or None, resubmit=resubmit)
            log.info("console: settled a parked submit: %s", outcome, extra={"job_id": job_id})
            return {"adopted": "adopted", "resubmitted": "resubmitted"}.get(str(outcome), "settled")

        return job_action(request, job_id, form, act)

    # --- bulk actions by filter ---

    @router.get("/bulk", response_class=HTMLResponse)
    def bulk_confirm(request: Request) -> Response:
        def run(session: Session_) -> Response:
            params = query(request)
            action = params.get("action", "")
            if action not in ("retry", "cancel"):
                raise InvalidInput("action: retry or cancel")
            flt, fields = parse_filter(params, session.who, now())
            counts = jobs.count_by_state(sessions, flt)
            wanted = [State.FAILED] if action == "retry" else sorted(ACTIVE, key=lambda s: s.value)
            if flt.states:
                wanted = [s for s in wanted if s in flt.states]
            matching = sum(counts.get(s.value, 0) for s in wanted)
            return page(
                "bulk.html", request, session=session, action=action, fields=fields, matching=matching, wanted=[s.value for s in wanted]
            )

        return guarded(request, run)

    @router.post("/bulk")
    async def bulk(request: Request) -> Response:
        form = await read_form(request)

        def run(session: Session_) -> Response:
            action = form.get("action", "")
            if action not in ("retry", "cancel"):
                raise InvalidInput("action: retry or cancel")
            flt, fields = parse_filter(form, session.who, now())
            deps = deps_factory()
            if action == "retry":
                done = operator.retry_matching(deps, tenant=session.who.scope, job_filter=flt)
                relay(deps, None)
            else:
                done = operator.cancel_matching(
                    deps, tenant=session.who.scope, job_filter=flt, reason=f"cancelled in the console, bulk ({_actor(session)})"
                )
            log.info("console: bulk %s of %d job(s)", action, len(done))
            return back("/jobs", **fields, done=f"bulk-{action}", n=str(len(done)))

        return guarded(request, run, form=form)

    # --- health and charts ---

    @router.get("/health", response_class=HTMLResponse)
    def health(request: Request) -> Response:
        def run(session: Session_) -> Response:
            deps = deps_factory()
            at = now()
            backlog = stats.backlog(sessions, tenant=session.who.scope, parked_code=ErrorCode.NEEDS_OPERATOR.value)
            breaker = _try(lambda: deps.breaker.state())
            held = _try(lambda: deps.limiter.slots_held())
            capacity = _try(lambda: deps.limiter.capacity())
            workers = _try(lambda: deps.fleet.workers_seen(WORKERS_SEEN_SECONDS))
            usage = tenants.usage(sessions, settings, tenant=session.who.scope)
            return page(
                "health.html",
                request,
                session=session,
                backlog=backlog,
                breaker=breaker,
                held=held,
                capacity=capacity,
                max_concurrency=settings.max_concurrency,
                rate_per_minute=settings.rate_limit_per_minute,
                workers=sorted(workers.items()) if isinstance(workers, dict) else workers,
                workers_window=int(WORKERS_SEEN_SECONDS),
                usage=usage,
                verdict=bottleneck(backlog, breaker, held, capacity, workers, settings.max_concurrency, at),
                wall_now=time.time(),  # heartbeats carry the wall clock's epoch seconds
            )

        return guarded(request, run)

    @router.get("/charts", response_class=HTMLResponse)
    def charts(request: Request) -> Response:
        def run(session: Session_) -> Response:
            params = query(request)
            try:
                window = stats.Window(params.get("window") or "24h")
            except ValueError:
                raise InvalidInput("window: 1h, 24h or 7d") from None
            tenant = params.get("tenant") or None
            if tenant is not None and not session.who.admin and tenant != session.who.tenant:
                raise ConsoleError(403, "only an admin key may look at another tenant")
            if tenant is not None and len(tenant) > 64:
                raise InvalidInput("tenant: at most 64 characters")
            data = stats.charts(
                sessions,
                window,
                now(),
                tenant=tenant if session.who.admin else session.who.tenant,
                cost_per_submission=settings.cost_per_submission,
            )
            labels = _labels(data.start, window)
            return page(
                "charts.html",
                request,
                session=session,
                data=data,
                window=window.value,
                windows=[w.value for w in stats.Window],
                tenant=tenant or "",
                throughput=stacked_bars(data.throughput, labels, title="Jobs finished per bucket"),
                queue_wait=percentile_lines(data.queue_wait, labels, title="Queue wait (created → submitted)"),
                end_to_end=percentile_lines(data.end_to_end, labels, title="End to end (created → succeeded)"),
                errors=horizontal_bars(
                    [(c, float(n)) for c, n in data.error_codes], title="Failed jobs by error code", fmt=lambda v: f"{v:.0f}"
                ),
                cost=horizontal_bars([(t, c) for t, _, _, c in data.paid], title="Cost per tenant", fmt=lambda v: f"{v:.4f}"),
            )

        return guarded(request, run)

    return router


def bottleneck(
    backlog: stats.Backlog, breaker: Any, held: Any, capacity: Any, workers: Any, max_concurrency: int, now: datetime
) -> tuple[str, str]:
    """(level, sentence): where the work is waiting, from what the health page shows."""
    if isinstance(breaker, dict) and breaker.get("open"):
        return (
            "bad",
            f"The provider is the bottleneck: the circuit breaker is open ({breaker.get('reason') or 'no reason recorded'}); submissions are paused.",
        )
    if isinstance(workers, dict) and not workers:
        return "bad", "No worker has been seen in the last minute: nothing is running the jobs."
    waiting = backlog.queued
    if waiting and isinstance(held, int) and held >= max_concurrency:
        return "warn", f"The provider is the bottleneck: all {max_concurrency} concurrency slots are in use and {waiting} job(s) wait."
    if waiting and capacity is not None and not isinstance(capacity, int) and hasattr(capacity, "reason"):
        return "warn", f"The provider is the bottleneck: {capacity.reason}; {waiting} job(s) wait."
    oldest = backlog.oldest_queued
    if waiting and oldest is not None and (now - oldest).total_seconds() > 60:
        return (
            "warn",
            f"The workers are the bottleneck: provider slots are free but the oldest queued job waits {_ago(oldest, now).replace(' ago', '')}.",
        )
    if backlog.outbox_unsent and backlog.outbox_oldest is not None and (now - backlog.outbox_oldest).total_seconds() > 60:
        return "warn", "The outbox relay is behind: messages older than a minute are not published (is the beat running?)."
    return "ok", "No bottleneck: queued jobs are picked up and the provider has room."


def _try(read: Callable[[], Any]) -> Any:
    """A Redis read for the health page: its value, or an `Unavailable` saying why not."""
    try:
        return read()
    except Exception as exc:
        return Unavailable(type(exc).__name__)


@dataclass(frozen=True)
class Unavailable:
    why: str

    def __str__(self) -> str:
        return f"unavailable ({self.why})"


def _storage(link_storage: Callable[[], Any]) -> Any:
    try:
        return link_storage()
    except Exception as exc:  # no S3 settings: the page shows the s3:// URIs without links
        log.warning("console: cannot sign links (%s)", type(exc).__name__)
        return None


def _signer(link_storage: Callable[[], Any]) -> Any:
    """The storage that signs a link, or a 503 page saying it cannot."""
    storage = _storage(link_storage)
    if storage is None:
        raise ConsoleError(503, "object storage is not configured here: no link to the image")
    return storage


def _safe_next(target: str) -> bool:
    # Only back into the console: never an absolute URL or a scheme-relative one (an open redirect).
    return target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target and len(target) < 2000


def _actor(session: Session_) -> str:
    return f"key {session.who.key_id or '?'} of {session.who.tenant}"


def _notice(done: str, n: str) -> str | None:
    text = NOTICES.get(done)
    if text and done.startswith("bulk-") and n.isdigit():
        return f"{text} ({int(n)} job(s))"
    return text


__all__ = ["PREFIX", "SESSION_COOKIE", "csrf_token", "install", "make_router", "parse_filter"]
