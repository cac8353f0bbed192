"""Unit-test fixtures: no services. A fake clock, explicit Settings, a migrated SQLite file per
test, an in-memory WaveSpeed stand-in behind `httpx.MockTransport`, moto S3, and `deps` wiring them.

Nothing here patches the package: every piece is injected through the seams the code offers.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import shutil
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from PIL import Image

from worker.adapters.breaker import MemoryBreaker
from worker.adapters.database import get_engine, migrate, session_factory
from worker.adapters.fleet import MemoryFleet
from worker.adapters.journal import MemoryJournal
from worker.adapters.limiter import MemoryLimiter
from worker.adapters.storage import Storage
from worker.adapters.wavespeed import MODEL, SUBMIT_PATH
from worker.config import Settings
from worker.core import jobs
from worker.core.jobs import NewJob
from worker.core.steps import Next, RecordingPublisher, Step
from worker.core.validation import ImageInput
from worker.engine import copier, poller, submit
from worker.engine.deps import Deps, make_provider

API_KEY = "ws-unit-test-key-5d1e8c0b7a94"
BASE_URL = "https://api.wavespeed.test"
CDN_HOST = "cdn.wavespeed.test"
BUCKET = "edit-worker-unit"
PREFIX = "edits"


# --- time -----------------------------------------------------------------------------------


class FakeClock:
    """`now()` is an aware UTC datetime that moves only when a test calls `advance()`;
    `monotonic()` is the same time as float seconds (for the in-memory limiter, breaker and fleet)."""

    def __init__(self, start: datetime | None = None):
        self.start = start or datetime.now(timezone.utc).replace(microsecond=0)
        self.current = self.start

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return 10_000.0 + (self.current - self.start).total_seconds()

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- images ---------------------------------------------------------------------------------


def image_bytes(fmt: str = "PNG", *, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    mode = "P" if fmt == "GIF" else "RGB"
    Image.new("RGB", size, color).convert(mode).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    """`make_image("JPEG", color=(1, 2, 3))` -> the bytes of a tiny real image."""
    return image_bytes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries (almost) no pixels: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def decompression_bomb() -> bytes:
    return png_header_only(20000, 20000)


@pytest.fixture
def png_file(tmp_path):
    path = tmp_path / "input.png"
    path.write_bytes(image_bytes("PNG"))
    return path


# --- settings and database ------------------------------------------------------------------


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory) -> str:
    """Alembic runs once per session; each test gets a copy of the migrated file."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    migrate(f"sqlite:///{path}")
    return str(path)


@pytest.fixture
def database_url(tmp_path, migrated_template) -> str:
    path = tmp_path / "jobs.db"
    shutil.copyfile(migrated_template, path)
    url = f"sqlite:///{path}"
    yield url
    get_engine(url).dispose()


@pytest.fixture
def settings(database_url) -> Settings:
    return Settings(
        _env_file=None,
        database_url=database_url,
        wavespeed_api_key=API_KEY,
        wavespeed_base_url=BASE_URL,
        celery_broker_url="memory://",
        s3_endpoint_url=None,
        s3_bucket=BUCKET,
        s3_prefix=PREFIX,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        aws_region="us-east-1",
        job_deadline_seconds=3600.0,
        first_poll_delay=3.0,
        poll_interval=2.0,
        poll_jitter=0.5,
        backoff_base=2.0,
        backoff_max=60.0,
        breaker_open_seconds=60.0,
        http_timeout=10.0,
        http_connect_timeout=2.0,
        stuck_after_seconds=60.0,
        max_image_bytes=1024 * 1024,
        allow_private_urls=False,
        base64_output=False,
        # The step-by-step `drive` fixture follows task mode's chain; test_poller.py and
        # test_submitter.py cover the batch modes.
        poll_mode="task",
        submit_mode="task",
        # A pass takes what is due at once; test_submitter.py covers adaptive pacing.
        adaptive_pacing=False,
    )


@pytest.fixture
def sessions(database_url):
    return session_factory(database_url)


# --- the provider ---------------------------------------------------------------------------


@dataclass
class After:
    """A scripted action: answer the request normally (e.g. create the task), then raise `error`
    — what a read timeout after the provider accepted the submit looks like to the client."""

    error: Exception


@dataclass
class FakeTask:
    id: str
    created_at: datetime
    body: dict[str, Any]
    status: str = "created"
    outputs: list[str] = field(default_factory=list)
    has_nsfw_contents: list[bool] = field(default_factory=list)
    error: str = ""
    polls: int = 0
    via_submit: bool = False


def envelope(data: Any, code: int = 200, message: str = "success") -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}


def iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class FakeWaveSpeed:
    """An in-memory WaveSpeed for `httpx.MockTransport`: creates tasks on submit, answers result,
    list and cancel, and serves output bytes from a CDN host.

    Scripting: `fake.script("submit", httpx.Response(500), After(httpx.ReadTimeout("t")))` — each
    call to that route consumes the next action: a Response is returned as is (nothing happens at
    the provider), an exception is raised before anything happens, `After(exc)` does the real
    work and then raises, a callable is called with the request before the real work.
    Routes: submit, result, cancel, list, download.
    """

    After = After  # tests write `fake_provider.After(httpx.ReadTimeout("..."))`

    _RESULT = re.compile(r"^/api/v3/predictions/([^/]+)/result$")
    _ONE = re.compile(r"^/api/v3/predictions/([^/]+)$")

    def __init__(self, clock: FakeClock, api_key: str = API_KEY):
        self.clock = clock
        self.api_key = api_key
        self.tasks: dict[str, FakeTask] = {}
        self.requests: list[tuple[str, httpx.Request]] = []
        self.calls: dict[str, int] = defaultdict(int)
        self.scripted: dict[str, deque] = defaultdict(deque)
        self.cancelled: list[str] = []
        self.list_bodies: list[dict[str, Any]] = []
        self.missing_outputs: set[str] = set()
        # A task completes on its Nth result call with `auto_outcome` (None: never by itself).
        self.polls_to_complete = 1
        self.auto_outcome: str | None = "completed"
        self.auto_error = "the model could not process the image"
        self.outputs_per_task = 1
        self.output_bytes: dict[tuple[str, int], bytes] = {}
        self._seq = 0

    # -- test controls ---------------------------------------------------------------------

    def script(self, route: str, *actions: Any) -> None:
        self.scripted[route].extend(actions)

    def create_task(self, body: dict[str, Any] | None = None, *, created_at: datetime | None = None, via_submit: bool = False) -> FakeTask:
        """A task as if someone submitted it (tests use it for tasks not created through the client)."""
        self._seq += 1
        task = FakeTask(id=f"pred-{self._seq:04d}", created_at=created_at or self.clock.now(), body=dict(body or {}), via_submit=via_submit)
        self.tasks[task.id] = task
        return task

    def finish(self, task_id: str, status: str = "completed", error: str = "") -> FakeTask:
        task = self.tasks[task_id]
        task.status = status
        if status == "completed":
            base64_output = bool(task.body.get("enable_base64_output"))
            task.outputs = []
            for index in range(self.outputs_per_task):
                data = image_bytes("PNG", color=(10 + 40 * index, 100, (self._seq * 17) % 256), size=(16, 16))
                self.output_bytes[(task.id, index)] = data
                task.outputs.append(base64.b64encode(data).decode() if base64_output else self.output_url(task.id, index))
            task.has_nsfw_contents = [False] * self.outputs_per_task
        else:
            task.error = error
        return task

    def output_url(self, task_id: str, index: int) -> str:
        return f"https://{CDN_HOST}/outputs/{task_id}/{index}.png"

    @property
    def submissions(self) -> list[FakeTask]:
        """Tasks created through the submit endpoint, in order (what the account is billed for)."""
        return [t for t in self.tasks.values() if t.via_submit]

    def requests_to(self, route: str) -> list[httpx.Request]:
        return [r for name, r in self.requests if name == route]

    # -- the wire --------------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        route, task_id = self._route(request)
        self.calls[route] += 1
        self.requests.append((route, request))
        action = self.scripted[route].popleft() if self.scripted[route] else None
        if isinstance(action, BaseException):
            raise action
        if isinstance(action, httpx.Response):
            return action
        if callable(action) and not isinstance(action, After):
            action(request)  # something that happens meanwhile (e.g. an operator cancels the job)
        if route != "download" and request.headers.get("authorization") != f"Bearer {self.api_key}":
            response = httpx.Response(401, json={"code": 401, "message": "Unauthorized: invalid API key"})
        else:
            response = getattr(self, f"_{route}")(request, task_id)
        if isinstance(action, After):
            raise action.error
        return response

    def _route(self, request: httpx.Request) -> tuple[str, str | None]:
        path, method = request.url.path, request.method
        if request.url.host == CDN_HOST:
            return "download", None
        if method == "POST" and path == SUBMIT_PATH:
            return "submit", None
        if method == "POST" and path == "/api/v3/predictions":
            return "list", None
        if method == "GET" and (m := self._RESULT.match(path)):
            return "result", m.group(1)
        if method == "DELETE" and (m := self._ONE.match(path)):
            return "cancel", m.group(1)
        return "unknown", None

    def _prediction(self, task: FakeTask) -> dict[str, Any]:
        return {
            "id": task.id,
            "model": MODEL,
            "outputs": list(task.outputs),
            "urls": {"get": f"{BASE_URL}/api/v3/predictions/{task.id}/result"},
            "has_nsfw_contents": list(task.has_nsfw_contents),
            "status": task.status,
            "created_at": iso(task.created_at),
            "error": task.error,
            "timings": {"inference": 1234} if task.status == "completed" else {},
        }

    def _submit(self, request: httpx.Request, _id: None) -> httpx.Response:
        body = json.loads(request.content)
        task = self.create_task(body, via_submit=True)
        return httpx.Response(200, json=envelope(self._prediction(task)))

    def _result(self, request: httpx.Request, task_id: str) -> httpx.Response:
        task = self.tasks.get(task_id)
        if task is None:
            return httpx.Response(404, json={"code": 404, "message": f"prediction {task_id} not found"})
        task.polls += 1
        if task.status in ("created", "processing"):
            task.status = "processing"
            if self.auto_outcome and self.polls_to_complete is not None and task.polls >= self.polls_to_complete:
                self.finish(task.id, self.auto_outcome, self.auto_error)
        return httpx.Response(200, json=envelope(self._prediction(task)))

    def _cancel(self, request: httpx.Request, task_id: str) -> httpx.Response:
        task = self.tasks.get(task_id)
        if task is None:
            return httpx.Response(404, json={"code": 404, "message": "not found"})
        self.cancelled.append(task_id)
        if task.status in ("created", "processing"):
            task.status = "cancelled"
        return httpx.Response(200, json=envelope(None))

    def _list(self, request: httpx.Request, _id: None) -> httpx.Response:
        body = json.loads(request.content)
        self.list_bodies.append(body)
        after = datetime.fromisoformat(body["created_after"].replace("Z", "+00:00")) if body.get("created_after") else None
        before = datetime.fromisoformat(body["created_before"].replace("Z", "+00:00")) if body.get("created_before") else None
        items = [
            t
            for t in self.tasks.values()
            if (after is None or t.created_at >= after)
            and (before is None or t.created_at <= before)
            and (not body.get("status") or t.status == body["status"])
            and (not body.get("model") or body["model"] == MODEL)
        ]
        items.sort(key=lambda t: t.created_at, reverse=True)
        page, size = int(body.get("page", 1)), int(body.get("page_size", 20))
        chunk = items[(page - 1) * size : page * size]
        return httpx.Response(200, json=envelope({"page": page, "total": len(items), "items": [self._prediction(t) for t in chunk]}))

    def _download(self, request: httpx.Request, _id: None) -> httpx.Response:
        url = str(request.url)
        match = re.match(rf"^https://{re.escape(CDN_HOST)}/outputs/([^/]+)/(\d+)\.png$", url)
        if url in self.missing_outputs or not match or (match.group(1), int(match.group(2))) not in self.output_bytes:
            return httpx.Response(404, text="Not Found", headers={"content-type": "text/plain"})
        return httpx.Response(200, content=self.output_bytes[(match.group(1), int(match.group(2)))], headers={"content-type": "image/png"})

    def _unknown(self, request: httpx.Request, _id: None) -> httpx.Response:
        return httpx.Response(404, json={"code": 404, "message": "no such endpoint"})


@pytest.fixture
def fake_provider(clock) -> FakeWaveSpeed:
    return FakeWaveSpeed(clock)


def public_dns(host: str) -> list[str]:
    """DNS for the unit tests' made-up hosts (*.test): every name is a public address; address
    literals stay themselves, so the output-URL guard still refuses 169.254.169.254 and friends."""
    return ["127.0.0.1", "::1"] if host == "localhost" else ["93.184.216.34"]


@pytest.fixture
def provider(settings, fake_provider):
    client = make_provider(settings, httpx.MockTransport(fake_provider), resolver=public_dns)
    yield client
    client.close()


# --- S3 -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _s3_client():
    """One real boto3 client, built the way the worker builds it (creating one costs ~0.1 s).
    moto is imported first, so the client carries moto's hook, which is live only inside mock_aws()."""
    import moto  # noqa: F401

    from worker.adapters.storage import make_s3_client

    return make_s3_client(
        Settings(_env_file=None, aws_access_key_id="testing", aws_secret_access_key="testing", aws_region="us-east-1", s3_endpoint_url=None)
    )


@pytest.fixture
def s3(settings, _s3_client):
    """A real boto3 client against moto's in-process S3 (fresh, empty state per test), bucket created."""
    from moto import mock_aws

    with mock_aws():
        _s3_client.create_bucket(Bucket=settings.s3_bucket)
        yield _s3_client


@pytest.fixture
def storage(settings, s3) -> Storage:
    return Storage.from_settings(settings, client=s3)


@pytest.fixture(scope="session")
def _unreachable_s3_client():
    import boto3
    from botocore.config import Config

    # Port 9 (discard) refuses connections; one attempt keeps the tests fast.
    return boto3.session.Session().client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="AKIAUNITTEST",
        aws_secret_access_key="super-secret-s3-key",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1, read_timeout=1, s3={"addressing_style": "path"}),
    )


@pytest.fixture
def down_storage(_unreachable_s3_client) -> Storage:
    """S3 that is down: the worker's Storage over a real boto3 client whose endpoint refuses connections."""
    return Storage(_unreachable_s3_client, BUCKET, PREFIX)


def object_keys(s3_client, bucket: str = BUCKET) -> list[str]:
    return sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.fixture
def list_keys(s3) -> Callable[[], list[str]]:
    return lambda: object_keys(s3)


# --- everything wired -----------------------------------------------------------------------


@pytest.fixture
def limiter(clock) -> MemoryLimiter:
    return MemoryLimiter(clock=clock.monotonic)


@pytest.fixture
def breaker(clock) -> MemoryBreaker:
    return MemoryBreaker(clock=clock.monotonic)


@pytest.fixture
def journal() -> MemoryJournal:
    return MemoryJournal()


@pytest.fixture
def fleet(clock) -> MemoryFleet:
    return MemoryFleet(clock=clock.monotonic)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def deps(settings, sessions, provider, storage, limiter, breaker, journal, fleet, publisher, clock) -> Deps:
    return Deps(
        settings=settings,
        sessions=sessions,
        provider=provider,
        storage=storage,
        limiter=limiter,
        breaker=breaker,
        journal=journal,
        fleet=fleet,
        publisher=publisher,
        clock=clock.now,
        rng=random.Random(0),
    )


IMAGE_URL = "https://images.example.com/cat.png"


@pytest.fixture
def new_job(sessions, settings, clock, request) -> Callable[..., str]:
    """Insert one queued job (as a producer would, already validated) and return its id. A
    `data:` URI image is stored in (moto) S3 as admission does; a URL is kept as it is."""

    def make(
        *,
        prompt: str = "make the sky purple",
        image: str = IMAGE_URL,
        size: str = "1024*1024",
        seed: int = 42,
        idempotency_key: str | None = None,
        enable_base64_output: bool = False,
        deadline_seconds: float | None = None,
        tenant: str = "default",
        priority: str = "normal",
    ) -> str:
        new = NewJob(
            image=ImageInput(ref=image, payload=image),
            prompt=prompt,
            size=size,
            seed=seed,
            idempotency_key=idempotency_key,
            enable_base64_output=enable_base64_output,
            tenant=tenant,
            priority=priority,
        )
        inputs = request.getfixturevalue("storage") if image.startswith("data:") else None
        [(job, _created)] = jobs.create_jobs(
            sessions, [new], deadline_seconds=deadline_seconds or settings.job_deadline_seconds, clock=clock.now, inputs=inputs
        )
        return job.id

    return make


def run_step(deps: Deps, nxt: Next) -> Next | None:
    """What the Celery task for `nxt` does, minus Celery."""
    if nxt.step == Step.SUBMIT:
        return submit.run_submit(deps, nxt.job_id)
    if nxt.step == Step.POLL:
        return poller.run_poll(deps, nxt.job_id, nxt.poll_seq)
    if nxt.step == Step.UPLOAD:
        return copier.run_upload(deps, nxt.job_id)
    raise AssertionError(f"unknown step {nxt.step}")


@pytest.fixture
def drive(deps, clock) -> Callable[..., list[Next]]:
    """Run a job's steps one after another, advancing the fake clock by each countdown, until a step
    schedules nothing (or `max_steps`). Returns the steps that ran."""

    def go(job_id: str, first: str = Step.SUBMIT, *, max_steps: int = 50) -> list[Next]:
        nxt: Next | None = Next(first, job_id)
        ran: list[Next] = []
        while nxt is not None and len(ran) < max_steps:
            clock.advance(nxt.countdown)
            ran.append(nxt)
            nxt = run_step(deps, nxt)
        return ran

    return go


@pytest.fixture
def load(sessions) -> Callable[[str], Any]:
    """The job row as the database has it now (payload columns included)."""
    return lambda job_id: jobs.get_job(sessions, job_id, with_payloads=True)


# --- one step at a time (the engine's step tests share these) --------------------------------


def _submitted(deps: Deps, job_id: str) -> Next:
    nxt = submit.run_submit(deps, job_id)
    assert nxt is not None and nxt.step == "poll", nxt
    return nxt


def _to_upload(deps: Deps, job_id: str) -> None:
    first = _submitted(deps, job_id)
    assert poller.run_poll(deps, job_id, first.poll_seq) == Next("upload", job_id)


@pytest.fixture
def submitted() -> Callable[[Deps, str], Next]:
    """`submitted(deps, job_id)`: run the submit step, check it went through to processing, and
    return its Next (the first poll)."""
    return _submitted


@pytest.fixture
def to_upload() -> Callable[[Deps, str], None]:
    """`to_upload(deps, job_id)`: submit and poll a job until it is uploading (outputs not copied yet)."""
    return _to_upload


@pytest.fixture
def states() -> Callable[[Any, str], list[str]]:
    """`states(sessions, job_id)`: the states a job's event rows went through, in order."""
    return lambda sessions, job_id: [e.to_state for e in jobs.job_events(sessions, job_id)]
