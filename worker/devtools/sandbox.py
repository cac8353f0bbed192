"""Local WaveSpeed-compatible provider (Dreamina V3.0 Edit) for development, demo and tests.
Owns the fake submit/result/cancel/list/download endpoints, fault injection (a hostile-provider mode
among them) and the /_sandbox admin API."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import io
import json
import math
import os
import random
import re
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MODEL_ID = "bytedance/dreamina-v3.0/edit"
SUBMIT_PATH = "/api/v3/" + MODEL_ID

PROMPT_MAX_CHARS = 120
SIZE_MIN, SIZE_MAX = 512, 2048
DEFAULT_SIZE = "1328*1328"
SEED_MIN, SEED_MAX = -1, 2147483647
LIST_PAGE_SIZE_MAX = 100
# The real list endpoint only shows the past 7 days; the sandbox also forgets older tasks so that a
# long-running sandbox keeps bounded memory. MAX_TASKS caps memory under sustained load.
RETENTION_SECONDS = 7 * 24 * 3600
MAX_TASKS = 100_000
# Solid-colour palette PNGs are a few hundred bytes, edited ones up to a few MB: the cache is bounded
# by entry count and by bytes.
PNG_CACHE_ENTRIES = 256
PNG_CACHE_BYTES = 128 * 1024 * 1024
# Share of the latency during which a task still reports "created" before "processing".
CREATED_PHASE = 0.1

INJECTED_TASK_FAILURE = "sandbox: injected task failure"
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]


@dataclass
class SandboxConfig:
    latency: float = 2.0  # seconds from submit until a task is "completed"
    api_key: str | None = None  # if set, Bearer token must equal it; if None any non-empty Bearer
    fail_rate: float = 0.0  # fraction of tasks that end "failed"
    submit_error_rate: float = 0.0  # fraction of submits answered submit_error_status, no task created
    submit_error_status: int = 500  # 429 adds Retry-After: 1; 502/503/504 answer an HTML body
    result_error_rate: float = 0.0  # fraction of GET result calls answered 500
    slow_submit_rate: float = 0.0  # fraction of submits that create the task, then answer late
    slow_submit_seconds: float = 30.0
    download_fail_rate: float = 0.0  # fraction of output downloads answered 503
    outage: bool = False  # every non-admin endpoint answers 503 with an HTML body
    auth_failure: bool = False  # every provider endpoint answers 401 (as with a revoked key)
    seed: int | None = None  # RNG seed for the injected-fault draws
    webhook_secret: str | None = None  # signs webhook calls (`?webhook=URL` on submit); None: none sent
    # Hostile provider: this fraction of submits, result polls and output downloads get a hostile
    # answer (HOSTILE_KINDS), the kinds taken in turn so that a short run meets them all. None of
    # them is a definitive answer: a correct client retries and every job still succeeds.
    hostile_rate: float = 0.0
    hostile_kinds: str = ""  # comma-separated subset of HOSTILE_KINDS; "" = all
    internal_url: str = "http://169.254.169.254/latest/meta-data/"  # where hostile redirects point
    # "edit": outputs are a visible edit of the input (worker/devtools/imaging.py); "flat": a solid
    # colour PNG, cheap to make, for benchmarks that measure the worker rather than Pillow.
    outputs: str = "edit"


_RATE_FIELDS = ("fail_rate", "submit_error_rate", "result_error_rate", "slow_submit_rate", "download_fail_rate", "hostile_rate")

# What a hostile provider (or a broken path to it) answers, per endpoint. By default submits get
# only answered errors (nothing created). "duplicate_id" is opt-in (name it in hostile_kinds): it
# creates the task but answers another task's id, so the client cannot name what it paid for and
# the reconciler must find it in the task list (with concurrent submits, only an operator can).
HOSTILE_KINDS: dict[str, tuple[str, ...]] = {
    "submit": ("html_4xx", "duplicate_id"),
    "result": ("html_4xx", "proxy_json_404", "garbage_json", "truncated_json", "wrong_id", "malformed_id", "endless_body", "slow_drip"),
    "download": ("redirect_private", "redirect_loop", "html_4xx", "wrong_type", "disguised_html", "endless_body", "slow_drip"),
}
ALL_HOSTILE_KINDS = frozenset(kind for kinds in HOSTILE_KINDS.values() for kind in kinds)
OPT_IN_HOSTILE_KINDS = frozenset({"duplicate_id"})
# Hostile bodies end by themselves eventually (a client that never hangs up cannot pin the sandbox).
HOSTILE_BODY_MAX_BYTES = 1024 * 1024 * 1024
HOSTILE_DRIP_SECONDS = 120.0
_NON_NEGATIVE_FIELDS = ("latency", "slow_submit_seconds")
_BOOL_FIELDS = ("outage", "auth_failure")
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(SandboxConfig)}
OUTPUT_KINDS = ("edit", "flat")
# The most input the sandbox reads to edit; a larger one is edited as the placeholder.
INPUT_MAX_BYTES = 32 * 1024 * 1024
INPUT_FETCH_TIMEOUT = 10.0


class ConfigError(ValueError):
    """A sandbox config value is out of range or of the wrong type."""


def _check_config(config: SandboxConfig) -> None:
    for name in _RATE_FIELDS:
        value = getattr(config, name)
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be a number between 0 and 1")
    for name in _NON_NEGATIVE_FIELDS:
        value = getattr(config, name)
        if not _is_number(value) or value < 0 or not math.isfinite(value):
            raise ConfigError(f"{name} must be a non-negative number")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be a boolean")
    status = config.submit_error_status
    if not _is_int(status) or not 400 <= status <= 599:
        raise ConfigError("submit_error_status must be an integer HTTP error status (400..599)")
    if config.seed is not None and not _is_int(config.seed):
        raise ConfigError("seed must be an integer or null")
    if config.api_key is not None and (not isinstance(config.api_key, str) or not config.api_key):
        raise ConfigError("api_key must be a non-empty string or null")
    if not isinstance(config.hostile_kinds, str) or not set(_kinds(config.hostile_kinds)) <= ALL_HOSTILE_KINDS:
        raise ConfigError(f"hostile_kinds must be a comma-separated subset of {', '.join(sorted(ALL_HOSTILE_KINDS))}")
    if not isinstance(config.internal_url, str) or not config.internal_url.startswith(("http://", "https://")):
        raise ConfigError("internal_url must be an http(s) URL")
    if config.outputs not in OUTPUT_KINDS:
        raise ConfigError(f"outputs must be one of {', '.join(OUTPUT_KINDS)}")


def _kinds(value: str) -> list[str]:
    return [kind.strip() for kind in value.split(",") if kind.strip()]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _public_config(config: SandboxConfig) -> dict[str, Any]:
    body = dataclasses.asdict(config)
    # The key is a secret even in a sandbox: say whether one is set, never what it is.
    body["api_key"] = "<redacted>" if config.api_key is not None else None
    body["webhook_secret"] = "<redacted>" if config.webhook_secret is not None else None
    return body


@dataclass
class _Task:
    id: str
    seq: int
    prompt: str
    seed: int
    width: int
    height: int
    base64_output: bool
    image: str  # the input as submitted (URL, data URI or bare base64)
    outputs: str  # OUTPUT_KINDS, as configured at submit
    submitted_at: float  # clock() reading at submit
    created_at: datetime  # wall time, truncated to milliseconds like the real API
    latency: float  # latency in force at submit; later config changes don't move it
    will_fail: bool  # decided at submit so a task's fate never flips between polls
    cancelled: bool = False

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"

    def status(self, now: float) -> str:
        if self.cancelled:
            return "cancelled"
        elapsed = now - self.submitted_at
        if elapsed >= self.latency:
            return "failed" if self.will_fail else "completed"
        if elapsed < self.latency * CREATED_PHASE:
            return "created"
        return "processing"


class _Counters:
    def __init__(self) -> None:
        self.submissions = 0
        self.submit_requests = 0
        self.result_requests = 0
        self.downloads = 0
        self.cancels = 0
        self.list_requests = 0
        self.webhooks = 0
        self.hostile: dict[str, int] = {}  # "endpoint:kind" -> hostile answers given


Fetch = Callable[[str], "bytes | None"]


def fetch_input(url: str) -> bytes | None:
    """The input image at `url` (at most INPUT_MAX_BYTES), or None when it cannot be read."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=INPUT_FETCH_TIMEOUT, follow_redirects=True) as response:
            if response.status_code != 200:
                return None
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > INPUT_MAX_BYTES:
                    return None
            return bytes(body)
    except (httpx.HTTPError, OSError):
        return None


def input_bytes(image: str, fetch: Fetch) -> bytes | None:
    """The submitted image's bytes: decoded from a data URI or bare base64, fetched from a URL."""
    image = image.strip()
    if image[:8].lower().startswith(("http://", "https://")):
        return fetch(image)
    match = _DATA_URI_RE.match(image)
    try:
        return base64.b64decode(image[match.end() :] if match else image)
    except (binascii.Error, ValueError):
        return None


class _PngCache:
    """LRU of generated output PNGs; a miss regenerates byte-identical PNGs (the output is a pure
    function of the task and its input), so eviction never changes what a client downloads."""

    def __init__(self, max_entries: int = PNG_CACHE_ENTRIES, fetch: Fetch = fetch_input) -> None:
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._max_entries = max_entries
        self._fetch = fetch
        self._bytes = 0

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    async def get(self, task: _Task) -> bytes:
        png = self._entries.get(task.id)
        if png is not None:
            self._entries.move_to_end(task.id)
            return png
        # Encoding takes milliseconds; keep it off the event loop so polls stay fast meanwhile.
        png = await anyio.to_thread.run_sync(self._render, task)
        self._entries[task.id] = png
        self._entries.move_to_end(task.id)
        self._bytes += len(png)
        while len(self._entries) > self._max_entries or (self._bytes > PNG_CACHE_BYTES and len(self._entries) > 1):
            self._bytes -= len(self._entries.popitem(last=False)[1])
        return png

    def _render(self, task: _Task) -> bytes:
        if task.outputs == "flat":
            return render_png(task.prompt, task.seed, task.id, task.width, task.height)
        return render_edit(input_bytes(task.image, self._fetch), task.prompt, task.seed, task.width, task.height)


def render_edit(image: bytes | None, prompt: str, seed: int, width: int, height: int) -> bytes:
    """The sandbox's edited image: `image` visibly transformed by prompt and seed, the prompt on it."""
    from worker.devtools.imaging import edit_png  # imported lazily: only downloads need Pillow

    return edit_png(image, prompt, seed, width, height)


def output_colour(prompt: str, seed: int, prediction_id: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{prediction_id}".encode()).digest()
    return digest[0], digest[1], digest[2]


def render_png(prompt: str, seed: int, prediction_id: str, width: int, height: int) -> bytes:
    """The sandbox's flat output (`--outputs flat`): a solid PNG whose colour is derived from the task."""
    from PIL import Image  # imported lazily: only downloads need Pillow

    # A one-entry palette image encodes in a few ms even at 2048*2048 and stays a few hundred
    # bytes, while still decoding to an ordinary image of the requested size.
    image = Image.new("P", (width, height), 0)
    image.putpalette(list(output_colour(prompt, seed, prediction_id)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


class SandboxState:
    """All mutable sandbox state. Handlers are async and run on one event loop, so no locks."""

    def __init__(self, config: SandboxConfig, clock: Clock, sleep: Sleep, fetch: Fetch = fetch_input) -> None:
        self.config = config
        self.clock = clock
        self.sleep = sleep
        # Maps clock() readings onto wall time once, so an injected clock also moves created_at.
        self._epoch_offset = time.time() - clock()
        self.rng = random.Random(config.seed)
        self.tasks: dict[str, _Task] = {}
        self._order: deque[_Task] = deque()
        self._seq = 0
        self.counters = _Counters()
        self.pngs = _PngCache(fetch=fetch)
        self._webhooks: set[asyncio.Task] = set()
        self._hostile_turn: dict[str, int] = {}
        # One client for every webhook call: a client per call builds an SSL context each time
        # (tens of ms of CPU), which made the sandbox, not the worker, the bottleneck of a
        # 2,000-job webhooks benchmark (its event loop then answered polls late too).
        self._webhook_client: Any = None

    def reset(self) -> None:
        self.tasks.clear()
        self._order.clear()
        self.counters = _Counters()
        self.pngs.clear()
        self.rng = random.Random(self.config.seed)
        self._hostile_turn.clear()

    def update_config(self, changes: dict[str, Any]) -> SandboxConfig:
        unknown = sorted(set(changes) - _CONFIG_FIELDS)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        new_config = dataclasses.replace(self.config, **changes)
        _check_config(new_config)
        self.config = new_config
        if "seed" in changes:
            self.rng = random.Random(new_config.seed)
        return new_config

    def hostile(self, endpoint: str) -> str | None:
        """The hostile answer this request gets (None: an honest one). Kinds are taken in turn."""
        if not self.draw(self.config.hostile_rate):
            return None
        allowed = set(_kinds(self.config.hostile_kinds)) or ALL_HOSTILE_KINDS - OPT_IN_HOSTILE_KINDS
        kinds = [kind for kind in HOSTILE_KINDS[endpoint] if kind in allowed]
        if not kinds:
            return None
        turn = self._hostile_turn.get(endpoint, 0)
        self._hostile_turn[endpoint] = turn + 1
        kind = kinds[turn % len(kinds)]
        name = f"{endpoint}:{kind}"
        self.counters.hostile[name] = self.counters.hostile.get(name, 0) + 1
        return kind

    def draw(self, rate: float) -> bool:
        # Rates of exactly 0 or 1 consume no randomness, so deterministic tests stay deterministic.
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        return self.rng.random() < rate

    def wall_time(self, clock_reading: float) -> datetime:
        moment = datetime.fromtimestamp(self._epoch_offset + clock_reading, tz=timezone.utc)
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def create_task(self, *, prompt: str, seed: int, width: int, height: int, base64_output: bool, image: str = "") -> _Task:
        now = self.clock()
        self._seq += 1
        task = _Task(
            id=uuid.uuid4().hex,
            seq=self._seq,
            prompt=prompt,
            seed=seed,
            width=width,
            height=height,
            base64_output=base64_output,
            image=image if self.config.outputs == "edit" else "",  # a flat output never reads it
            outputs=self.config.outputs,
            submitted_at=now,
            created_at=self.wall_time(now),
            latency=float(self.config.latency),
            will_fail=self.draw(self.config.fail_rate),
        )
        self.tasks[task.id] = task
        self._order.append(task)
        self.counters.submissions += 1
        self._forget_old(now)
        return task

    def _forget_old(self, now: float) -> None:
        while self._order and (len(self._order) > MAX_TASKS or now - self._order[0].submitted_at > RETENTION_SECONDS):
            old = self._order.popleft()
            self.tasks.pop(old.id, None)

    def schedule_webhook(self, task: _Task, url: str, base_url: str) -> None:
        """Like the provider: when the task ends, POST it to `url`, signed (webhook-id,
        webhook-timestamp, webhook-signature: v3,HMAC-SHA256(secret sans whsec_, "id.ts.body"))."""
        job = asyncio.get_running_loop().create_task(self._deliver_webhook(task, url, base_url, self.config.webhook_secret or ""))
        self._webhooks.add(job)
        job.add_done_callback(self._webhooks.discard)

    async def _deliver_webhook(self, task: _Task, url: str, base_url: str, secret: str) -> None:
        import httpx

        wait = task.submitted_at + task.latency - self.clock()
        if wait > 0:
            await self.sleep(wait)
        body = json.dumps(await self.prediction(task, base_url)).encode()
        key = (secret[len("whsec_") :] if secret.startswith("whsec_") else secret).encode()
        for attempt in range(3):
            webhook_id, timestamp = uuid.uuid4().hex, str(int(time.time()))
            signature = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": timestamp,
                "webhook-signature": f"v3,{signature}",
            }
            try:
                loop = asyncio.get_running_loop()
                if self._webhook_client is None or self._webhook_client[0] is not loop:  # a client lives on one loop
                    self._webhook_client = (loop, httpx.AsyncClient(timeout=5.0))
                response = await self._webhook_client[1].post(url, content=body, headers=headers)
                if response.status_code < 500:
                    self.counters.webhooks += 1
                    return
            except httpx.HTTPError:
                pass
            await self.sleep(1.0 + attempt)

    async def prediction(self, task: _Task, base_url: str, *, status: str | None = None) -> dict[str, Any]:
        status = status or task.status(self.clock())
        outputs: list[str] = []
        if status == "completed":
            if task.base64_output:
                # The provider's base64 outputs are bare: no "data:image/png;base64," prefix.
                outputs = [base64.b64encode(await self.pngs.get(task)).decode("ascii")]
            else:
                outputs = [f"{base_url}/outputs/{task.id}/0.png"]
        return {
            "id": task.id,
            "model": MODEL_ID,
            "outputs": outputs,
            "urls": {"get": f"{base_url}/api/v3/predictions/{task.id}/result"},
            "has_nsfw_contents": [False],
            "status": status,
            "created_at": _iso(task.created_at),
            "error": INJECTED_TASK_FAILURE if status == "failed" else "",
            "timings": {"inference": int(task.latency * 1000) if status in ("completed", "failed") else 0},
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise _Invalid(f"{field} must be an ISO 8601 timestamp string")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _Invalid(f"{field} is not a valid ISO 8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


class _Invalid(Exception):
    """A request body field is invalid; the message names the field and why."""


# --- responses -----------------------------------------------------------------------------------


def _envelope(code: int, message: str, data: Any = None, *, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "data": data}, status_code=code, headers=headers)


def _ok(data: Any) -> JSONResponse:
    return JSONResponse({"code": 200, "message": "success", "data": data})


_HTML_PAGES = {
    502: "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>",
    503: "<html><head><title>503 Service Temporarily Unavailable</title></head><body><center>"
    "<h1>503 Service Temporarily Unavailable</h1></center></body></html>",
    504: "<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway Time-out</h1></center></body></html>",
}


def _html_error(status: int) -> HTMLResponse:
    page = _HTML_PAGES.get(status, f"<html><body><h1>{status} Error</h1></body></html>")
    return HTMLResponse(page, status_code=status)


def _injected_submit_error(status: int) -> Response:
    if status in _HTML_PAGES:
        # Gateways in front of the real API answer these with HTML, not the JSON envelope.
        return _html_error(status)
    if status == 429:
        return _envelope(429, "Too Many Requests: rate limit exceeded", headers={"Retry-After": "1"})
    return _envelope(status, "sandbox: injected submit error")


# --- hostile answers -------------------------------------------------------------------------------

_PROXY_PAGES = {
    400: "<html><head><title>400 Bad Request</title></head><body><center><h1>400 Bad Request</h1></center><hr><center>nginx</center></body></html>",
    403: "<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head><body>Sorry, you have been blocked</body></html>",
    404: "<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center><hr><center>nginx</center></body></html>",
}


def _endless(head: bytes, filler: bytes) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        yield head
        sent = len(head)
        chunk = filler * (65536 // len(filler))
        while sent < HOSTILE_BODY_MAX_BYTES:
            yield chunk
            sent += len(chunk)
            await asyncio.sleep(0)  # let the loop notice the client hung up

    return body()


def _drip(state: SandboxState, payload: bytes) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        # One byte every half second: each read is quick, the whole answer takes minutes.
        started = state.clock()
        for index in range(len(payload)):
            if state.clock() - started > HOSTILE_DRIP_SECONDS:
                return
            yield payload[index : index + 1]
            await state.sleep(0.5)

    return body()


async def _hostile_answer(state: SandboxState, endpoint: str, kind: str, request: Request, task: _Task | None) -> Response:
    """A hostile (or broken-path) answer of `kind`; never a definitive one."""
    base_url = _base_url(request)
    if kind == "html_4xx":
        status = state.rng.choice(sorted(_PROXY_PAGES))
        return HTMLResponse(_PROXY_PAGES[status], status_code=status)
    if kind == "proxy_json_404":  # an API gateway's own JSON, not the provider's envelope
        return JSONResponse({"message": "no Route matched with those values"}, status_code=404)
    if kind == "redirect_private":
        target = state.config.internal_url
        if state.rng.random() < 0.5:  # the same place under another name
            target = re.sub(r"^(https?://)(?:\[[^\]]*\]|[^/:]+)", r"\1localhost", target)
        return RedirectResponse(target, status_code=state.rng.choice([301, 302, 307]))
    if kind == "redirect_loop":
        return RedirectResponse(str(request.url), status_code=302)
    if kind == "wrong_type":
        return HTMLResponse("<html><body>Welcome! Please log in to the hotel wifi.</body></html>", status_code=200)
    if kind == "disguised_html":
        return Response(b"<html><body>not an image</body></html>", media_type="image/png")
    assert task is not None
    answer = {"code": 200, "message": "success", "data": await state.prediction(task, base_url)}
    if kind == "garbage_json":
        return Response(b"\x00\xff{{{ not json ]]\xfe" + os.urandom(32), media_type="application/json")
    if kind == "truncated_json":
        whole = json.dumps(answer).encode()
        return Response(whole[: max(1, len(whole) // 2)], media_type="application/json")
    if kind == "wrong_id":
        others = [other for other in state.tasks.values() if other.id != task.id]
        other = state.rng.choice(others) if others else None
        data = cast(dict[str, Any], answer["data"])
        answer["data"] = await state.prediction(other, base_url) if other else {**data, "id": uuid.uuid4().hex}
        return JSONResponse(answer)
    if kind == "malformed_id":
        cast(dict[str, Any], answer["data"])["id"] = state.rng.choice([f"../{task.id}", 12345, "x" * 300, None, f"{task.id} "])
        return JSONResponse(answer)
    if kind == "endless_body":
        if endpoint == "download":
            return StreamingResponse(_endless(b"\x89PNG\r\n\x1a\n", b"\x00"), media_type="image/png")
        # A completed answer whose base64 output never ends.
        head = b'{"code": 200, "message": "success", "data": {"id": "' + task.id.encode() + b'", "status": "completed", "outputs": ["'
        return StreamingResponse(_endless(head, b"A"), media_type="application/json")
    if kind == "slow_drip":
        if endpoint == "download":
            return StreamingResponse(_drip(state, await state.pngs.get(task)), media_type="image/png")
        return StreamingResponse(_drip(state, json.dumps(answer).encode()), media_type="application/json")
    raise AssertionError(f"unknown hostile kind {kind}")


def _unauthorized(message: str) -> JSONResponse:
    return _envelope(401, message)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# --- request validation ----------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*\*\s*(\d{1,5})\s*$")
_DATA_URI_RE = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


@dataclass
class _EditRequest:
    prompt: str
    image: str
    width: int
    height: int
    seed: int
    base64_output: bool
    sync_mode: bool


def _validate_edit(body: Any) -> _EditRequest:
    if not isinstance(body, dict):
        raise _Invalid("request body must be a JSON object")

    prompt = body.get("prompt")
    if prompt is None:
        raise _Invalid("prompt is required")
    if not isinstance(prompt, str):
        raise _Invalid("prompt must be a string")
    if not prompt.strip():
        raise _Invalid("prompt must not be empty")
    if len(prompt) > PROMPT_MAX_CHARS:
        raise _Invalid(f"prompt must be at most {PROMPT_MAX_CHARS} characters (got {len(prompt)})")

    image = body.get("image")
    if image is None:
        raise _Invalid("image is required")
    if not isinstance(image, str) or not image.strip():
        raise _Invalid("image must be a non-empty string (URL or base64)")
    _validate_image(image.strip())

    size = body.get("size")
    if size is None:
        size = DEFAULT_SIZE
    if not isinstance(size, str):
        raise _Invalid('size must be a string "W*H"')
    match = _SIZE_RE.match(size)
    if not match:
        raise _Invalid(f'size must look like "W*H" (got {size[:32]!r})')
    width, height = int(match.group(1)), int(match.group(2))
    for name, value in (("width", width), ("height", height)):
        if not SIZE_MIN <= value <= SIZE_MAX:
            raise _Invalid(f"size {name} must be between {SIZE_MIN} and {SIZE_MAX} (got {value})")

    seed = body.get("seed")
    if seed is None:
        seed = -1
    if not _is_int(seed):
        raise _Invalid("seed must be an integer")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise _Invalid(f"seed must be between {SEED_MIN} and {SEED_MAX} (got {seed})")

    flags = {}
    for name in ("enable_base64_output", "enable_sync_mode"):
        flag: Any = body.get(name)
        if flag is None:
            flag = False
        if not isinstance(flag, bool):
            raise _Invalid(f"{name} must be a boolean")
        flags[name] = flag

    return _EditRequest(
        prompt=prompt,
        image=image,
        width=width,
        height=height,
        seed=seed,
        base64_output=flags["enable_base64_output"],
        sync_mode=flags["enable_sync_mode"],
    )


def _validate_image(image: str) -> None:
    lowered = image[:8].lower()
    if lowered.startswith(("http://", "https://")):
        host = image.split("://", 1)[1].split("/", 1)[0]
        if not host or any(c.isspace() for c in image):
            raise _Invalid("image URL is malformed")
        return
    if lowered.startswith("data:"):
        match = _DATA_URI_RE.match(image)
        if not match:
            raise _Invalid("image data URI must look like data:image/<type>;base64,<payload>")
        payload = image[match.end() :]
    else:
        payload = image
    if not payload:
        raise _Invalid("image base64 payload is empty")
    try:
        binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _Invalid("image must be an http(s) URL, a data:image/...;base64 URI or valid base64") from None


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise _Invalid("request body is not valid JSON") from None


# --- the app ----------------------------------------------------------------------------------------


def create_app(
    config: SandboxConfig | None = None,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    fetch: Fetch = fetch_input,
) -> FastAPI:
    """Build the sandbox app. `clock` drives every status/time computation and `sleep` every wait
    (sync mode, slow submits), so tests can advance time without sleeping; `fetch` reads an input
    image given by URL (to edit it)."""
    config = config if config is not None else SandboxConfig()
    _check_config(config)
    app = FastAPI(title="WaveSpeed sandbox", docs_url=None, redoc_url=None, openapi_url=None)
    state = SandboxState(config, clock, sleep, fetch)
    app.state.sandbox = state

    def gate(request: Request, *, provider: bool) -> Response | None:
        """Answer the configured outage/auth behaviour, or None to let the request through."""
        cfg = state.config
        if cfg.outage:
            return _html_error(503)
        if not provider:
            return None  # output URLs are public CDN links at the real provider: no auth
        if cfg.auth_failure:
            return _unauthorized("Unauthorized: invalid or revoked API key")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _unauthorized("Unauthorized: missing Bearer API key")
        if cfg.api_key is not None and not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            return _unauthorized("Unauthorized: invalid API key")
        return None

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _envelope(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.post(SUBMIT_PATH)
    async def submit(request: Request) -> Response:
        state.counters.submit_requests += 1
        if (refusal := gate(request, provider=True)) is not None:
            return refusal
        cfg = state.config
        if state.draw(cfg.submit_error_rate):
            return _injected_submit_error(cfg.submit_error_status)
        kind = state.hostile("submit")
        if kind == "html_4xx":
            return await _hostile_answer(state, "submit", kind, request, None)
        try:
            edit = _validate_edit(await _json_body(request))
        except _Invalid as invalid:
            return _envelope(400, str(invalid))

        slow = state.draw(cfg.slow_submit_rate)
        task = state.create_task(
            prompt=edit.prompt, seed=edit.seed, width=edit.width, height=edit.height, base64_output=edit.base64_output, image=edit.image
        )
        base_url = _base_url(request)
        if kind == "duplicate_id":  # billed, but answered with another task's id
            others = [other for other in state.tasks.values() if other.id != task.id]
            if others:
                return _ok(await state.prediction(state.rng.choice(others), base_url, status="created"))
        if edit.sync_mode:
            remaining = task.submitted_at + task.latency - state.clock()
            if remaining > 0:
                await state.sleep(remaining)
            answer = await state.prediction(task, base_url)
        else:
            # Snapshot at creation: a slow submit is a response delayed in transit, not a later answer.
            answer = await state.prediction(task, base_url, status="created")
        webhook = request.query_params.get("webhook")
        if webhook and cfg.webhook_secret and webhook.startswith(("http://", "https://")):
            state.schedule_webhook(task, webhook, base_url)
        if slow:
            await state.sleep(cfg.slow_submit_seconds)
        return _ok(answer)

    @app.get("/api/v3/predictions/{prediction_id}/result")
    async def result(request: Request, prediction_id: str) -> Response:
        state.counters.result_requests += 1
        if (refusal := gate(request, provider=True)) is not None:
            return refusal
        if state.draw(state.config.result_error_rate):
            return _envelope(500, "sandbox: injected internal error")
        task = state.tasks.get(prediction_id)
        if task is None:
            return _envelope(404, f"prediction {prediction_id[:64]} not found")
        if (kind := state.hostile("result")) is not None:
            return await _hostile_answer(state, "result", kind, request, task)
        return _ok(await state.prediction(task, _base_url(request)))

    @app.delete("/api/v3/predictions/{prediction_id}")
    async def cancel(request: Request, prediction_id: str) -> Response:
        state.counters.cancels += 1
        if (refusal := gate(request, provider=True)) is not None:
            return refusal
        task = state.tasks.get(prediction_id)
        if task is None:
            return _envelope(404, f"prediction {prediction_id[:64]} not found")
        status = task.status(state.clock())
        if status in TERMINAL_STATUSES:
            return _envelope(400, f"prediction {task.id} is already {status} and cannot be cancelled")
        task.cancelled = True
        return _ok(await state.prediction(task, _base_url(request)))

    @app.post("/api/v3/predictions")
    async def list_predictions(request: Request) -> Response:
        state.counters.list_requests += 1
        if (refusal := gate(request, provider=True)) is not None:
            return refusal
        try:
            query = _validate_list(await _json_body(request))
        except _Invalid as invalid:
            return _envelope(400, str(invalid))
        now = state.clock()
        visible_since = state.wall_time(now - RETENTION_SECONDS)
        matches = []
        for task in state.tasks.values():
            status = task.status(now)
            if task.created_at < visible_since:
                continue
            if query["model"] is not None and query["model"] != MODEL_ID:
                continue
            if query["status"] is not None and status != query["status"]:
                continue
            if query["created_after"] is not None and task.created_at < query["created_after"]:
                continue
            if query["created_before"] is not None and task.created_at > query["created_before"]:
                continue
            matches.append((task, status))
        matches.sort(key=lambda pair: (pair[0].created_at, pair[0].seq), reverse=True)
        page, page_size = query["page"], query["page_size"]
        window = matches[(page - 1) * page_size : page * page_size]
        base_url = _base_url(request)
        items = [await state.prediction(task, base_url, status=status) for task, status in window]
        return _ok({"page": page, "total": len(matches), "items": items})

    @app.get("/outputs/{prediction_id}/{filename}")
    async def download(request: Request, prediction_id: str, filename: str) -> Response:
        state.counters.downloads += 1
        if (refusal := gate(request, provider=False)) is not None:
            return refusal
        task = state.tasks.get(prediction_id)
        if task is None or filename != "0.png" or task.status(state.clock()) != "completed":
            return _envelope(404, "output not found")
        if state.draw(state.config.download_fail_rate):
            return _html_error(503)
        if (kind := state.hostile("download")) is not None:
            return await _hostile_answer(state, "download", kind, request, task)
        return Response(await state.pngs.get(task), media_type="image/png")

    # --- admin: never affected by outage or auth_failure, so tests can always steer the sandbox ---

    @app.get("/_sandbox/health")
    async def health() -> Response:
        return JSONResponse({"ok": True})

    @app.get("/_sandbox/stats")
    async def stats() -> Response:
        now = state.clock()
        counters = state.counters
        return JSONResponse(
            {
                "submissions": counters.submissions,
                "submit_requests": counters.submit_requests,
                "result_requests": counters.result_requests,
                "downloads": counters.downloads,
                "cancels": counters.cancels,
                "list_requests": counters.list_requests,
                "webhooks": counters.webhooks,
                "hostile": dict(sorted(counters.hostile.items())),
                "tasks": [
                    {
                        "id": task.id,
                        "prompt": task.prompt,
                        "seed": task.seed,
                        "size": task.size,
                        "status": task.status(now),
                        "created_at": _iso(task.created_at),
                    }
                    for task in state.tasks.values()
                ],
            }
        )

    @app.get("/_sandbox/config")
    async def get_config() -> Response:
        return JSONResponse(_public_config(state.config))

    @app.put("/_sandbox/config")
    async def put_config(request: Request) -> Response:
        try:
            changes = await _json_body(request)
            if not isinstance(changes, dict):
                raise _Invalid("config update must be a JSON object")
            new_config = state.update_config(changes)
        except (_Invalid, ConfigError) as invalid:
            return _envelope(400, str(invalid))
        return JSONResponse(_public_config(new_config))

    @app.post("/_sandbox/reset")
    async def reset() -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    return app


def _validate_list(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Invalid("request body must be a JSON object")
    page = body.get("page", 1)
    if page is None:
        page = 1
    if not _is_int(page) or page < 1:
        raise _Invalid("page must be an integer >= 1")
    page_size = body.get("page_size", 20)
    if page_size is None:
        page_size = 20
    if not _is_int(page_size) or not 1 <= page_size <= LIST_PAGE_SIZE_MAX:
        raise _Invalid(f"page_size must be an integer between 1 and {LIST_PAGE_SIZE_MAX}")
    query: dict[str, Any] = {"page": page, "page_size": page_size}
    for name in ("model", "status"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise _Invalid(f"{name} must be a string")
        query[name] = value or None
    for name in ("created_after", "created_before"):
        value = body.get(name)
        query[name] = _parse_iso(value, name) if value not in (None, "") else None
    return query


# --- running it -------------------------------------------------------------------------------------


def serve(host: str = "127.0.0.1", port: int = 8900, config: SandboxConfig | None = None) -> None:
    """Run the sandbox until interrupted (blocking)."""
    import uvicorn

    # Slow submits and sync-mode waits hold requests open; don't let them stall a shutdown.
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=2)


_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    # (flag, config field, parser, help)
    ("--latency", "latency", float, "seconds from submit until a task completes"),
    ("--api-key", "api_key", str, "require this Bearer token; prefer the env var, which stays out of ps"),
    ("--fail-rate", "fail_rate", float, "fraction of tasks that end failed"),
    ("--submit-error-rate", "submit_error_rate", float, "fraction of submits answered with an error"),
    ("--submit-error-status", "submit_error_status", int, "HTTP status for injected submit errors"),
    ("--result-error-rate", "result_error_rate", float, "fraction of result polls answered 500"),
    ("--slow-submit-rate", "slow_submit_rate", float, "fraction of submits answered late"),
    ("--slow-submit-seconds", "slow_submit_seconds", float, "delay of a slow submit"),
    ("--download-fail-rate", "download_fail_rate", float, "fraction of output downloads answered 503"),
    ("--seed", "seed", int, "RNG seed for injected faults"),
    ("--webhook-secret", "webhook_secret", str, "sign webhook calls with this secret (prefer the env var)"),
    ("--hostile-rate", "hostile_rate", float, "fraction of submits, result polls and downloads answered by a hostile provider"),
    ("--hostile-kinds", "hostile_kinds", str, f"comma-separated hostile kinds ({', '.join(sorted(ALL_HOSTILE_KINDS))}); default all"),
    ("--internal-url", "internal_url", str, "where hostile redirects point (default the cloud metadata address)"),
    ("--outputs", "outputs", str, "edit: outputs are a visible edit of the input (default); flat: cheap solid-colour PNGs"),
]


def _env_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> tuple[str, int, SandboxConfig]:
    """Resolve (host, port, config) from flags, then SANDBOX_<FLAG> env vars, then defaults."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="edit-worker sandbox", description="Local WaveSpeed-compatible server.")
    parser.add_argument("--host", default=None, help="bind address (env SANDBOX_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (env SANDBOX_PORT, default 8900)")
    for flag, field, kind, help_text in _FLAGS:
        env_name = "SANDBOX_" + field.upper()
        parser.add_argument(flag, dest=field, type=kind, default=None, help=f"{help_text} (env {env_name})")
    parser.add_argument("--outage", action="store_true", default=None, help="answer 503 everywhere (env SANDBOX_OUTAGE)")
    parser.add_argument(
        "--auth-failure", action="store_true", default=None, help="answer 401 on every provider endpoint (env SANDBOX_AUTH_FAILURE)"
    )
    args = parser.parse_args(argv)

    def resolve(field: str, kind: Callable[[str], Any]) -> Any:
        value = getattr(args, field)
        if value is not None:
            return value
        env_name = "SANDBOX_" + field.upper()
        raw = env.get(env_name)
        if raw is None or raw == "":
            return None
        try:
            return kind(raw)
        except ValueError:
            parser.error(f"{env_name} is not a valid {getattr(kind, '__name__', 'value')}")

    overrides: dict[str, Any] = {}
    for _, field, kind, _ in _FLAGS:
        value = resolve(field, kind)
        if value is not None:
            overrides[field] = value
    for field in ("outage", "auth_failure"):
        value = resolve(field, _env_bool)
        if value is not None:
            overrides[field] = value
    config = SandboxConfig(**overrides)
    try:
        _check_config(config)
    except ConfigError as invalid:
        parser.error(str(invalid))

    host = resolve("host", str) or "127.0.0.1"
    port = resolve("port", int)
    return host, (8900 if port is None else port), config


def main(argv: list[str] | None = None) -> None:
    """`python -m worker.devtools.sandbox`: every flag can also come from SANDBOX_<FLAG> (the flag wins)."""
    host, port, config = parse_args(argv)
    print(f"WaveSpeed sandbox listening on http://{host}:{port} (latency {config.latency}s)", file=sys.stderr, flush=True)
    serve(host=host, port=port, config=config)


if __name__ == "__main__":
    main()
