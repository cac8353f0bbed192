"""The WaveSpeed client for Bytedance Dreamina V3.0 Edit: httpx, typed predictions, error taxonomy.

Every provider answer is mapped to a Prediction or to one ProviderError subclass by one pure
parser (`classify`); the API key lives only in request headers of API calls (never on output
downloads, never in a repr or a message). Bodies are read with caps and a total deadline, and
output downloads follow redirects by hand, each hop through the caller's URL guard.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import json as jsonlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import IO, Any, TypeVar, cast

import httpx
from pydantic import SecretStr

from worker.errors import (
    AmbiguousSubmitError,
    PermanentProviderError,
    ProviderAuthError,
    ProviderError,
    TransientProviderError,
)

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

MODEL = "bytedance/dreamina-v3.0/edit"
SUBMIT_PATH = f"/api/v3/{MODEL}"
DEFAULT_BASE_URL = "https://api.wavespeed.ai"

# What a prediction id may look like before it goes into a URL path (the provider's ids are hex):
# letters, digits, `-` and `_`, at most the column's 128 characters. An id from the provider, a
# webhook, the Redis journal or an operator that is not of this form never reaches a path, where
# `../`, `?` or `#` could turn a poll into some other request.
PREDICTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def valid_prediction_id(value: object) -> bool:
    return isinstance(value, str) and PREDICTION_ID.fullmatch(value) is not None


class InvalidPredictionId(PermanentProviderError):
    """A prediction id that cannot be the provider's: refused before any request is made."""


def _id_path(prediction_id: str) -> str:
    if not valid_prediction_id(prediction_id):
        shown = repr(prediction_id)[:40] if isinstance(prediction_id, str) else type(prediction_id).__name__
        raise InvalidPredictionId(f"prediction id {shown} is not of the provider's form", code="invalid_prediction_id")
    return prediction_id


# Envelope codes the provider uses for permanent refusals (besides HTTP 4xx).
CODE_MODERATION = 1200
CODE_MEDIA_UNREACHABLE = 1402

# What is read of an error answer: enough to classify it (an envelope or a proxy's page); the rest
# of an endless or huge error body is never read.
ERROR_BODY_LIMIT = 64 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
# Redirects an output download follows (each hop passes the URL guard).
MAX_REDIRECTS = 5
# A prediction id goes into URL paths: anything else (slashes, dots, spaces, megabytes) is garbage.
# Declared types an output download may carry; the copier also checks the bytes are an image.
_BINARY_TYPES = ("application/octet-stream", "binary/octet-stream", "")

UrlGuard = Callable[[str], None]  # raises ValueError for a URL that must not be fetched


class PredictionStatus(str, Enum):
    CREATED = "created"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    # Not on the model page, but the platform reports them; all three are final.
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    DELETED = "deleted"

    @classmethod
    def parse(cls, value: Any) -> PredictionStatus:
        try:
            return cls(str(value).lower())
        except ValueError:
            raise TransientProviderError(f"provider answered an unknown task status {str(value)[:40]!r}") from None

    @property
    def terminal(self) -> bool:
        return self not in (PredictionStatus.CREATED, PredictionStatus.PROCESSING)


@dataclass(frozen=True)
class EditRequest:
    """Every request parameter of the model page."""

    prompt: str
    image: str  # http(s) URL, data: URI or bare base64
    size: str = "1328*1328"
    seed: int = -1
    enable_base64_output: bool = False
    enable_sync_mode: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "image": self.image,
            "size": self.size,
            "seed": self.seed,
            "enable_base64_output": self.enable_base64_output,
            "enable_sync_mode": self.enable_sync_mode,
        }

    def __repr__(self) -> str:  # the image may be megabytes of base64: never log it whole
        return f"EditRequest(prompt={self.prompt!r}, image=<{len(self.image)} chars>, size={self.size!r}, seed={self.seed})"


def _malformed(what: str) -> TransientProviderError:
    return TransientProviderError(f"provider answered a prediction with {what}")


@dataclass(frozen=True)
class Prediction:
    id: str
    status: PredictionStatus
    model: str = MODEL
    outputs: list[str] = field(default_factory=list)
    has_nsfw_contents: list[bool] = field(default_factory=list)
    created_at: datetime | None = None
    error: str | None = None
    get_url: str | None = None
    inference_ms: int | None = None

    @classmethod
    def from_data(cls, data: Any) -> Prediction:
        """The envelope's `data`, checked field by field: a malformed prediction is a
        TransientProviderError (garbage in transit or a broken proxy), never a crash."""
        if not isinstance(data, dict):
            raise _malformed("no data object")
        raw_id = data.get("id")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not PREDICTION_ID.fullmatch(str(raw_id)):
            raise _malformed("a missing or malformed id")
        outputs = data.get("outputs")
        if outputs is None:
            outputs = []
        if not isinstance(outputs, list) or not all(isinstance(o, str) and o for o in outputs):
            raise _malformed("malformed outputs")
        nsfw = data.get("has_nsfw_contents")
        timings = data.get("timings")
        inference = timings.get("inference") if isinstance(timings, dict) else None
        urls = data.get("urls")
        get_url = urls.get("get") if isinstance(urls, dict) else None
        error = data.get("error")
        return cls(
            id=str(raw_id),
            status=PredictionStatus.parse(data.get("status")),
            model=str(data.get("model") or MODEL)[:128],
            outputs=list(outputs),
            has_nsfw_contents=[bool(x) for x in nsfw] if isinstance(nsfw, list) else [],
            created_at=parse_time(data.get("created_at")),
            error=str(error)[:1000] if error else None,
            get_url=get_url if isinstance(get_url, str) else None,
            inference_ms=int(inference)
            if isinstance(inference, (int, float)) and not isinstance(inference, bool) and 0 <= inference < 1e12
            else None,
        )

    def __repr__(self) -> str:
        return f"Prediction(id={self.id!r}, status={self.status.value!r}, outputs={len(self.outputs)})"


@dataclass(frozen=True)
class PredictionPage:
    page: int
    total: int
    items: list[Prediction]


def parse_time(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, min(seconds, 3600.0)) if seconds == seconds else None  # NaN: unreadable
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, min((when - datetime.now(timezone.utc)).total_seconds(), 3600.0))


# --- the parser: any answer -> ok / transient / permanent / auth --------------------------------


class Kind(str, Enum):
    OK = "ok"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    AUTH = "auth"


@dataclass(frozen=True)
class Verdict:
    """What one HTTP answer of the provider API means. `envelope`: the body is the provider's own
    JSON envelope (`{"code": int, "message": str, ...}`), not a proxy's page or garbage."""

    kind: Kind
    message: str
    status_code: int
    data: Any = None
    code: int | None = None
    envelope: bool = False
    retry_after: float | None = None

    def error(self, *, definitive: bool = False) -> ProviderError:
        """The exception for a verdict that is not OK."""
        kw: dict[str, Any] = {"code": self.code or self.status_code, "status_code": self.status_code}
        if self.kind is Kind.AUTH:
            return ProviderAuthError(self.message, **kw)
        if self.kind is Kind.PERMANENT:
            return PermanentProviderError(self.message, definitive=definitive, **kw)
        return TransientProviderError(self.message, retry_after=self.retry_after, **kw)


def looks_like_html(headers: Mapping[str, str], body: bytes) -> bool:
    if "html" in str(headers.get("content-type", "")).lower():
        return True
    return body[:64].lstrip().lower().startswith((b"<!doctype", b"<html"))


def read_envelope(headers: Mapping[str, str], body: bytes) -> dict[str, Any] | None:
    """The provider's JSON envelope, or None for anything else: an HTML page, a body that is not
    JSON (garbage, truncated), JSON that is not an object, or an object without an integer `code`
    and a string `message` (a proxy's or gateway's own JSON)."""
    if looks_like_html(headers, body):
        return None
    try:
        parsed = jsonlib.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(parsed, dict):
        return None
    code, message = parsed.get("code"), parsed.get("message")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(message, str):
        return None
    return parsed


def _describe(headers: Mapping[str, str], body: bytes, status: int) -> str:
    if looks_like_html(headers, body):
        return "an HTML page instead of JSON"
    if not body:
        return "an empty body"
    try:
        jsonlib.loads(body)
    except (ValueError, RecursionError):
        return "a body that is not JSON"
    return "JSON that is not the provider's envelope"


def classify(status: int, headers: Mapping[str, str], body: bytes, *, what: str = "provider") -> Verdict:
    """Any HTTP answer (any status, any headers, any body) -> a Verdict; never raises.

    OK only for a 2xx whose body is the envelope with code 200. 401/403 (by status or envelope
    code) are AUTH: systemic, whatever the body. 408, 429 and 5xx are TRANSIENT, honouring
    Retry-After. Another 4xx is PERMANENT only when the provider's own envelope says so; the same
    status with an HTML page, garbage or a proxy's JSON is TRANSIENT (a gateway's error page, not
    the provider's answer). A 2xx without the envelope is TRANSIENT as well."""
    envelope = read_envelope(headers, body)
    env_code = envelope.get("code") if envelope is not None else None
    retry_after = parse_retry_after(str(headers.get("retry-after", "")) or None)
    if envelope is not None:
        message = str(envelope.get("message") or "")[:500] or f"HTTP {status}"
    else:
        message = _describe(headers, body, status)
    text = f"{what}: {message}"
    if 200 <= status < 300 and env_code == 200:
        return Verdict(Kind.OK, text, status, data=envelope.get("data") if envelope else None, code=200, envelope=True)
    # The effective error code: the HTTP status, or for a 2xx the envelope's own code.
    effective = status if status >= 300 or env_code is None else env_code
    kw: dict[str, Any] = {"code": env_code if env_code not in (None, 200) else None, "envelope": envelope is not None}
    if effective in (401, 403):
        return Verdict(Kind.AUTH, text, status, **kw)
    if effective in (408, 429) or 500 <= effective < 600:
        return Verdict(Kind.TRANSIENT, text, status, retry_after=retry_after, **kw)
    if envelope is not None and effective >= 400:
        return Verdict(Kind.PERMANENT, text, status, **kw)
    return Verdict(Kind.TRANSIENT, text, status, retry_after=retry_after, **kw)


def classify_result(prediction_id: str, status: int, headers: Mapping[str, str], body: bytes) -> Prediction | ProviderError:
    """What a result lookup answered: the Prediction, or the error to raise. Never raises.

    Definitive (`error.definitive`): only the provider's envelope saying the task does not exist
    (code 404). A prediction answered for another id, or malformed, is transient."""
    verdict = classify(status, headers, body, what=f"GET /api/v3/predictions/{prediction_id}/result")
    if verdict.kind is not Kind.OK:
        missing = verdict.envelope and verdict.kind is Kind.PERMANENT and verdict.code == 404
        return verdict.error(definitive=missing)
    try:
        prediction = Prediction.from_data(verdict.data)
    except TransientProviderError as exc:
        exc.status_code = status
        return exc
    if prediction.id != prediction_id:
        return TransientProviderError(f"provider answered the result of another task ({prediction.id[:40]})", status_code=status)
    return prediction


# --- the client ------------------------------------------------------------------------------


def _origin(url: httpx.URL) -> tuple[str, int | None]:
    return url.host.lower(), url.port or {"http": 80, "https": 443}.get(url.scheme)


def outcome_of(exc: BaseException | None) -> str:
    """A provider call's outcome label: ok, ambiguous, transient, auth, permanent (or error)."""
    if exc is None:
        return "ok"
    for cls, name in ((AmbiguousSubmitError, "ambiguous"), (TransientProviderError, "transient"), (ProviderAuthError, "auth")):
        if isinstance(exc, cls):
            return name
    return "permanent" if isinstance(exc, PermanentProviderError) else "error"


def _observed(operation: str) -> Callable[[F], F]:
    """Report the decorated call's outcome to `self.on_call` (when set)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(self: WaveSpeedClient, *args: Any, **kwargs: Any) -> Any:
            if self.on_call is None:
                return fn(self, *args, **kwargs)
            try:
                answer = fn(self, *args, **kwargs)
            except BaseException as exc:
                _tell(self.on_call, operation, outcome_of(exc))
                raise
            _tell(self.on_call, operation, "ok")
            return answer

        return cast(F, call)

    return wrap


def _tell(on_call: Callable[[str, str], None], operation: str, outcome: str) -> None:
    try:
        on_call(operation, outcome)
    except Exception:  # metrics never change a call's answer
        pass


class WaveSpeedClient:
    """One pooled client per process; tests pass `transport=httpx.MockTransport(handler)`.

    `url_guard(url)` is called for every hop of an output download (engine/deps.py wires the SSRF
    guard with the operator's trusted hosts); it raises ValueError to refuse a URL."""

    def __init__(
        self,
        api_key: str | SecretStr | None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout | float = httpx.Timeout(60.0, connect=10.0),
        max_connections: int = 100,
        url_guard: UrlGuard | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        download_timeout: float = 120.0,
        on_call: Callable[[str, str], None] | None = None,
    ):
        # Told (operation, outcome) after every API call and download (metrics); must not block.
        self.on_call = on_call
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        self._secret = key or ""
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._http = httpx.Client(transport=transport, timeout=self._timeout, limits=limits, follow_redirects=False)
        self._auth_headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        self._url_guard = url_guard
        self.max_output_bytes = max_output_bytes
        # An API answer may carry base64 outputs: room for one at the cap, plus the envelope.
        self.max_answer_bytes = max_output_bytes * 4 // 3 + 1024 * 1024
        self.download_timeout = download_timeout
        # A whole API call (all of its reads) must end within the read timeout, not each read.
        self.call_timeout = self._timeout.read or 60.0

    def __repr__(self) -> str:
        return f"WaveSpeedClient(base_url={self.base_url!r}, api_key={'***' if self._secret else None})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WaveSpeedClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- API calls -------------------------------------------------------------------------

    @_observed("submit")
    def submit(self, request: EditRequest, *, webhook: str | None = None) -> Prediction:
        """POST the task (with `?webhook=URL` when given). AmbiguousSubmitError whenever the
        provider may have created (and will bill) a task we cannot name: a timeout or reset after
        sending, or a 2xx whose body is unreadable (not the envelope, truncated, over the cap, a
        malformed prediction). An answered error (4xx/5xx, or an envelope with an error code) is
        never ambiguous: nothing was created."""
        params = {"webhook": webhook} if webhook else None
        status, headers, body = self._call("POST", SUBMIT_PATH, json=request.to_json(), params=params, ambiguous=True)
        verdict = classify(status, headers, body, what=f"POST {SUBMIT_PATH}")
        if verdict.kind is Kind.OK:
            try:
                return self._prediction(verdict.data)
            except TransientProviderError as exc:
                raise AmbiguousSubmitError(f"submit answered {status} but {exc.message}", status_code=status) from None
        if 200 <= status < 300 and not verdict.envelope:
            raise AmbiguousSubmitError(f"submit answered {status} with {_describe(headers, body, status)}", status_code=status)
        raise self._scrubbed(verdict.error())

    @_observed("result")
    def result(self, prediction_id: str) -> Prediction:
        """The task's state. Raises PermanentProviderError with `definitive=True` only when the
        provider's own envelope says the task does not exist."""
        status, headers, body = self._call("GET", f"/api/v3/predictions/{_id_path(prediction_id)}/result")
        answer = classify_result(prediction_id, status, headers, body)
        if isinstance(answer, ProviderError):
            raise self._scrubbed(answer)
        return self._prediction_scrubbed(answer)

    @_observed("cancel")
    def cancel(self, prediction_id: str) -> None:
        status, headers, body = self._call("DELETE", f"/api/v3/predictions/{_id_path(prediction_id)}")
        verdict = classify(status, headers, body, what=f"DELETE /api/v3/predictions/{prediction_id}")
        if verdict.kind is not Kind.OK:
            raise self._scrubbed(verdict.error())

    @_observed("list")
    def list_predictions(
        self,
        *,
        page: int = 1,
        page_size: int = 100,
        model: str | None = MODEL,
        status: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> PredictionPage:
        body: dict[str, Any] = {"page": page, "page_size": min(page_size, 100)}
        if model:
            body["model"] = model
        if status:
            body["status"] = status
        if created_after:
            body["created_after"] = created_after.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        if created_before:
            body["created_before"] = created_before.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        answer = self._call("POST", "/api/v3/predictions", json=body)
        verdict = classify(*answer, what="POST /api/v3/predictions")
        if verdict.kind is not Kind.OK:
            raise self._scrubbed(verdict.error())
        data = verdict.data if isinstance(verdict.data, dict) else {}
        raw_items = data.get("items") or []
        if not isinstance(raw_items, list):
            raise TransientProviderError("provider answered a task list without a list of items")
        items = [self._prediction(item) for item in raw_items]
        got_page, total = data.get("page"), data.get("total")
        return PredictionPage(
            page=got_page if isinstance(got_page, int) and not isinstance(got_page, bool) else page,
            total=total if isinstance(total, int) and not isinstance(total, bool) else len(items),
            items=items,
        )

    @_observed("download")
    def download(self, url: str, sink: IO[bytes], *, max_bytes: int | None = None) -> str:
        """Stream an output URL into `sink`; returns its declared Content-Type. No Authorization
        header is sent: output URLs are on a CDN, not the API host.

        Redirects are followed by hand (at most MAX_REDIRECTS), every hop through the URL guard;
        the whole download, redirects included, must end within `download_timeout`; the body is
        capped at `max_bytes`; a declared type that is not an image (or plain binary) is refused
        before its body is read. A 401/403 is about the URL, not the API key (no breaker)."""
        limit = self.max_output_bytes if max_bytes is None else max_bytes
        started = time.monotonic()
        current = httpx.URL(url)
        for _hop in range(MAX_REDIRECTS + 1):
            self._guard(current)
            try:
                with self._http.stream("GET", current, timeout=self._remaining_timeout(started, self.download_timeout)) as response:
                    if response.is_redirect:
                        try:
                            current = response.url.join(response.headers["location"])
                        except (httpx.InvalidURL, ValueError):
                            raise TransientProviderError("output download redirected to a malformed URL") from None
                        continue
                    if not 200 <= response.status_code < 300:
                        body = self._read(response, ERROR_BODY_LIMIT, started, self.download_timeout, truncate=True)
                        self._raise_download_error(response, body)
                    declared = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if not (declared.startswith("image/") or declared in _BINARY_TYPES):
                        raise PermanentProviderError(f"output download answered {declared[:60]!r}, not an image", code="output_not_image")
                    total = 0
                    for chunk in response.iter_bytes():  # as it arrives: the deadline is checked per read
                        total += len(chunk)
                        if total > limit:
                            raise PermanentProviderError(f"output is larger than {limit} bytes", code="output_too_large")
                        if time.monotonic() - started > self.download_timeout:
                            raise TransientProviderError(
                                f"output download took longer than {self.download_timeout:.0f}s", code="download_timeout"
                            )
                        sink.write(chunk)
                    return declared or "application/octet-stream"
            except httpx.HTTPError as exc:
                raise TransientProviderError(f"output download failed: {type(exc).__name__}") from None
        raise TransientProviderError(f"output download redirected more than {MAX_REDIRECTS} times", code="too_many_redirects")

    # --- plumbing --------------------------------------------------------------------------

    def _guard(self, url: httpx.URL) -> None:
        if self._url_guard is None:
            return
        try:
            self._url_guard(str(url))
        except ValueError as exc:
            log.warning("output URL refused: %s", exc)
            raise PermanentProviderError(f"output URL refused: {exc}", code="output_url_refused") from None

    def _raise_download_error(self, response: httpx.Response, body: bytes) -> None:
        verdict = classify(response.status_code, response.headers, body, what="output download")
        if verdict.kind is Kind.AUTH:
            # The CDN got no credentials: an expired or forbidden URL, not a bad API key.
            raise PermanentProviderError(verdict.message, code="output_forbidden", status_code=response.status_code)
        if response.status_code in (404, 410):
            raise PermanentProviderError(verdict.message, code="output_not_found", status_code=response.status_code)
        if verdict.kind is Kind.OK:  # e.g. a 3xx without a Location: not an output
            raise TransientProviderError(f"output download answered HTTP {response.status_code}", status_code=response.status_code)
        raise self._scrubbed(verdict.error())

    def _remaining_timeout(self, started: float, total: float) -> httpx.Timeout:
        remaining = total - (time.monotonic() - started)
        if remaining <= 0:
            raise TransientProviderError(f"no complete answer within {total:.0f}s")
        t = self._timeout
        return httpx.Timeout(
            connect=min(t.connect or remaining, remaining),
            read=min(t.read or remaining, remaining),
            write=min(t.write or remaining, remaining),
            pool=min(t.pool or remaining, remaining),
        )

    def _read(self, response: httpx.Response, limit: int, started: float, total: float, *, truncate: bool) -> bytes:
        """At most `limit` bytes within the total deadline. `truncate`: keep the first `limit`
        bytes (an error page: its start is enough); else more than `limit` is an error."""
        parts: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                if truncate:
                    break
                raise _Oversize(f"answer is larger than {limit} bytes")
            if time.monotonic() - started > total:
                raise _TooSlow(f"no complete answer within {total:.0f}s")
        return b"".join(parts)[:limit]

    def _call(
        self, method: str, path: str, *, json: Any = None, params: dict | None = None, ambiguous: bool = False
    ) -> tuple[int, httpx.Headers, bytes]:
        """One API request: (status, headers, body), the body read with a cap and within
        `call_timeout` in all. Once the request may have been sent, anything short of a complete
        answer is AmbiguousSubmitError for a submit (`ambiguous`), else transient."""
        url = f"{self.base_url}{path}"
        started = time.monotonic()
        what = f"{method} {path}"
        try:
            with self._http.stream(method, url, json=json, params=params, headers=self._auth_headers) as response:
                answered_error = response.status_code >= 400
                try:
                    limit = ERROR_BODY_LIMIT if answered_error else self.max_answer_bytes
                    body = self._read(response, limit, started, self.call_timeout, truncate=answered_error)
                except (httpx.TransportError, _TooSlow) as exc:
                    if answered_error:  # the status already says nothing was done
                        body = b""
                    else:
                        cls = AmbiguousSubmitError if ambiguous else TransientProviderError
                        raise cls(f"{what}: answer cut off ({type(exc).__name__})", status_code=response.status_code) from None
                except _Oversize as exc:
                    cls = AmbiguousSubmitError if ambiguous else TransientProviderError
                    raise cls(f"{what}: {exc}", status_code=response.status_code) from None
                return response.status_code, response.headers, body
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached the provider: safe to retry, even for a submit.
            raise TransientProviderError(f"{what}: cannot connect ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            # Read/write timeouts, resets, protocol errors: the request may have been processed.
            cls = AmbiguousSubmitError if ambiguous else TransientProviderError
            raise cls(f"{what}: no answer ({type(exc).__name__})") from None

    def _prediction(self, data: Any) -> Prediction:
        return self._prediction_scrubbed(Prediction.from_data(data))

    def _prediction_scrubbed(self, prediction: Prediction) -> Prediction:
        # A task's error text is provider prose too: it ends up in job rows and messages, so scrub it.
        if prediction.error and self._secret and self._secret in prediction.error:
            prediction = dataclasses.replace(prediction, error=self._scrub(prediction.error))
        return prediction

    def _scrubbed(self, error: ProviderError) -> ProviderError:
        if self._secret and self._secret in error.message:
            error.message = self._scrub(error.message)
            error.args = (error.message,)
        return error

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


class _Oversize(Exception):
    """An answer body went past its cap."""


class _TooSlow(Exception):
    """An answer body did not arrive within the call's total deadline."""


def prediction_error(prediction: Prediction) -> ProviderError:
    """The error for a prediction that ended without outputs. Definitive: the provider's own
    envelope says the task failed (or was cancelled, timed out, deleted); retrying the same task
    cannot help."""
    message = prediction.error or f"provider task ended as {prediction.status.value}"
    return PermanentProviderError(message, code=f"task_{prediction.status.value}", definitive=True)
