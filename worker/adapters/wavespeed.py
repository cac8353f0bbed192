"""The WaveSpeed client for Bytedance Dreamina V3.0 Edit: httpx, typed predictions, error taxonomy.

Every provider answer is mapped to a Prediction or to one ProviderError subclass; the API key lives
only in request headers of API calls (never on output downloads, never in a repr or a message).
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import IO, Any

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
            raise TransientProviderError(f"provider answered an unknown task status {value!r}") from None

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
        if not isinstance(data, dict) or not data.get("id"):
            raise TransientProviderError("provider answered a prediction without an id")
        timings = data.get("timings") or {}
        urls = data.get("urls") or {}
        return cls(
            id=str(data["id"]),
            status=PredictionStatus.parse(data.get("status")),
            model=str(data.get("model") or MODEL),
            outputs=[str(o) for o in (data.get("outputs") or [])],
            has_nsfw_contents=[bool(x) for x in (data.get("has_nsfw_contents") or [])],
            created_at=parse_time(data.get("created_at")),
            error=(str(data["error"]) if data.get("error") else None),
            get_url=urls.get("get") if isinstance(urls, dict) else None,
            inference_ms=timings.get("inference") if isinstance(timings, dict) else None,
        )

    def __repr__(self) -> str:
        return f"Prediction(id={self.id!r}, status={self.status.value!r}, outputs={len(self.outputs)})"


@dataclass(frozen=True)
class PredictionPage:
    page: int
    total: int
    items: list[Prediction]


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _looks_like_html(response: httpx.Response) -> bool:
    if "html" in response.headers.get("content-type", "").lower():
        return True
    return response.content[:64].lstrip().lower().startswith((b"<!doctype", b"<html"))


class WaveSpeedClient:
    """One pooled client per process; tests pass `transport=httpx.MockTransport(handler)`."""

    def __init__(
        self,
        api_key: str | SecretStr | None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout | float = httpx.Timeout(60.0, connect=10.0),
        max_connections: int = 100,
    ):
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        self._secret = key or ""
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.Client(transport=transport, timeout=timeout, limits=limits, follow_redirects=False)
        self._auth_headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}

    def __repr__(self) -> str:
        return f"WaveSpeedClient(base_url={self.base_url!r}, api_key={'***' if self._secret else None})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WaveSpeedClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- API calls -------------------------------------------------------------------------

    def submit(self, request: EditRequest, *, webhook: str | None = None) -> Prediction:
        """POST the task (with `?webhook=URL` when given). A timeout or reset *after sending* raises
        AmbiguousSubmitError: the provider may have created (and will bill) the task, and there is
        no idempotency key to ask with."""
        params = {"webhook": webhook} if webhook else None
        response = self._call("POST", SUBMIT_PATH, json=request.to_json(), params=params, ambiguous=True)
        return self._prediction(self._data(response))

    def result(self, prediction_id: str) -> Prediction:
        response = self._call("GET", f"/api/v3/predictions/{_id_path(prediction_id)}/result")
        return self._prediction(self._data(response))

    def cancel(self, prediction_id: str) -> None:
        self._call("DELETE", f"/api/v3/predictions/{_id_path(prediction_id)}")

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
        data = self._data(self._call("POST", "/api/v3/predictions", json=body)) or {}
        items = [self._prediction(item) for item in data.get("items") or []]
        return PredictionPage(page=int(data.get("page") or page), total=int(data.get("total") or len(items)), items=items)

    def download(self, url: str, sink: IO[bytes], *, max_bytes: int = 64 * 1024 * 1024) -> str:
        """Stream an output URL into `sink`; returns its Content-Type. No Authorization header is
        sent: output URLs are on a CDN, not the API host."""
        try:
            # Redirects are followed here (CDNs and storage links redirect); no credential is sent.
            with self._http.stream("GET", url, follow_redirects=True) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        self._raise_for_status(response, what="output download")
                    except ProviderAuthError as exc:
                        # The CDN got no credentials: a 401/403 means an expired or forbidden URL,
                        # not a bad API key (no breaker), and the same URL will not work on a retry.
                        raise PermanentProviderError(exc.message, code="output_forbidden", status_code=exc.status_code) from None
                total = 0
                for chunk in response.iter_bytes(chunk_size=256 * 1024):
                    total += len(chunk)
                    if total > max_bytes:
                        raise PermanentProviderError(f"output is larger than {max_bytes} bytes", code="output_too_large")
                    sink.write(chunk)
                return response.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
        except httpx.HTTPError as exc:
            raise TransientProviderError(f"output download failed: {type(exc).__name__}") from None

    # --- plumbing --------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json: Any = None, params: dict | None = None, ambiguous: bool = False) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self._http.request(method, url, json=json, params=params, headers=self._auth_headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached the provider: safe to retry, even for a submit.
            raise TransientProviderError(f"{method} {path}: cannot connect ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            # Read/write timeouts, resets, protocol errors: the request may have been processed.
            cls = AmbiguousSubmitError if ambiguous else TransientProviderError
            raise cls(f"{method} {path}: no answer ({type(exc).__name__})") from None
        self._raise_for_status(response, what=f"{method} {path}")
        return response

    def _raise_for_status(self, response: httpx.Response, *, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        code, message = self._envelope_error(response)
        text = self._scrub(f"{what}: {message}")
        if status in (401, 403):
            raise ProviderAuthError(text, code=code or status, status_code=status)
        if status == 429:
            raise TransientProviderError(
                text, code=code or status, status_code=status, retry_after=parse_retry_after(response.headers.get("retry-after"))
            )
        if status >= 500 or status == 408:
            raise TransientProviderError(
                text, code=code or status, status_code=status, retry_after=parse_retry_after(response.headers.get("retry-after"))
            )
        raise PermanentProviderError(text, code=code or status, status_code=status)

    def _envelope_error(self, response: httpx.Response) -> tuple[int | None, str]:
        if _looks_like_html(response):
            return None, "HTML error page"
        try:
            body = response.json()
        except ValueError:
            return None, (response.text[:200] or response.reason_phrase)
        if isinstance(body, dict):
            code = body.get("code")
            return (code if isinstance(code, int) else None), str(body.get("message") or body.get("error") or response.reason_phrase)[:500]
        return None, response.reason_phrase

    def _data(self, response: httpx.Response) -> Any:
        if _looks_like_html(response):
            raise TransientProviderError("provider answered an HTML page instead of JSON", status_code=response.status_code)
        try:
            body = response.json()
        except ValueError:
            raise TransientProviderError("provider answered a body that is not JSON", status_code=response.status_code) from None
        if not isinstance(body, dict):
            raise TransientProviderError("provider answered an unexpected JSON shape", status_code=response.status_code)
        code = body.get("code", 200)
        if isinstance(code, int) and code != 200:
            message = self._scrub(str(body.get("message") or "provider error"))
            if code in (401, 403):
                raise ProviderAuthError(message, code=code, status_code=response.status_code)
            if code == 429 or 500 <= code < 600:
                raise TransientProviderError(message, code=code, status_code=response.status_code)
            raise PermanentProviderError(message, code=code, status_code=response.status_code)
        return body.get("data")

    def _prediction(self, data: Any) -> Prediction:
        prediction = Prediction.from_data(data)
        # A task's error text is provider prose too: it ends up in job rows and messages, so scrub it.
        if prediction.error and self._secret and self._secret in prediction.error:
            prediction = dataclasses.replace(prediction, error=self._scrub(prediction.error))
        return prediction

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def prediction_error(prediction: Prediction) -> ProviderError:
    """The error for a prediction that ended without outputs (permanent: retrying the same task cannot help)."""
    message = prediction.error or f"provider task ended as {prediction.status.value}"
    return PermanentProviderError(message, code=f"task_{prediction.status.value}")
