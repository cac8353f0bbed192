"""Specification of the WaveSpeed client against a hostile provider or path: any answer is
classified (ok / transient / permanent / auth) without a crash; only the provider's own JSON
envelope can be definitive; bodies are capped and time-boxed; output downloads follow redirects by
hand through the URL guard and refuse what is not an image."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.adapters.wavespeed import (
    ERROR_BODY_LIMIT,
    EditRequest,
    Kind,
    Prediction,
    WaveSpeedClient,
    classify,
    classify_result,
)
from worker.core.validation import output_url_guard
from worker.errors import (
    AmbiguousSubmitError,
    PermanentProviderError,
    ProviderAuthError,
    ProviderError,
    TransientProviderError,
)

KEY = "ws-secret-hostile-0123456789"
BASE = "https://api.wavespeed.test"
PID = "a1b2c3"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
HTML_404 = "<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1><hr>nginx</body></html>"
REQUEST = EditRequest(prompt="make the sky purple", image="https://images.example.com/cat.png")


def public_dns(host: str) -> list[str]:
    return ["93.184.216.34"]


def client_with(handler, **kw) -> WaveSpeedClient:
    kw.setdefault("url_guard", output_url_guard([BASE], resolver=public_dns))
    return WaveSpeedClient(KEY, BASE, transport=httpx.MockTransport(handler), **kw)


def envelope(data=None, code: int = 200, message: str = "success") -> dict:
    return {"code": code, "message": message, "data": data}


def prediction(status: str = "processing", **extra) -> dict:
    return {"id": PID, "status": status, "outputs": [], **extra}


# --- the parser: any status, any headers, any body ------------------------------------------

STATUSES = st.one_of(
    st.sampled_from([200, 201, 204, 301, 302, 400, 401, 403, 404, 408, 409, 410, 429, 500, 502, 503, 504]), st.integers(100, 599)
)
CONTENT_TYPES = st.sampled_from(["application/json", "text/html; charset=utf-8", "text/plain", "application/octet-stream", "", "TEXT/HTML"])
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
JSON_ANY = st.recursive(
    JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12
)
PREDICTION_DATA = st.fixed_dictionaries(
    {
        "id": st.one_of(st.just(PID), st.just("other-task"), JSON_LEAF, st.text(max_size=300)),
        "status": st.one_of(st.sampled_from(["created", "processing", "completed", "failed", "cancelled", "timeout", "deleted"]), JSON_ANY),
    },
    optional={
        "outputs": st.one_of(st.lists(st.text(max_size=30), max_size=3), JSON_ANY),
        "has_nsfw_contents": JSON_ANY,
        "timings": st.one_of(st.fixed_dictionaries({"inference": JSON_LEAF}), JSON_ANY),
        "urls": st.one_of(st.fixed_dictionaries({"get": JSON_LEAF}), JSON_ANY),
        "created_at": st.one_of(st.text(max_size=40), JSON_LEAF),
        "error": JSON_ANY,
        "model": JSON_ANY,
    },
)
ENVELOPES = st.fixed_dictionaries(
    {
        "code": st.one_of(st.sampled_from([200, 400, 401, 403, 404, 429, 500, 1200, 1402]), JSON_LEAF),
        "message": st.one_of(st.text(max_size=40), JSON_LEAF),
    },
    optional={"data": st.one_of(PREDICTION_DATA, JSON_ANY)},
)


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["envelope", "truncated", "json", "html", "bytes", "empty"]))
    if kind == "envelope":
        return json.dumps(draw(ENVELOPES)).encode()
    if kind == "truncated":
        whole = json.dumps(draw(ENVELOPES)).encode()
        return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    if kind == "json":
        return json.dumps(draw(JSON_ANY)).encode()
    if kind == "html":
        return HTML_404.encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return b""


HEADERS = st.fixed_dictionaries(
    {"content-type": CONTENT_TYPES},
    # Any bytes a header can carry (httpx takes latin-1 bytes as they are).
    optional={
        "retry-after": st.one_of(
            st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30).map(lambda t: t.encode("latin-1")),
            st.integers(-5, 10**9).map(str),
        )
    },
)


@settings(max_examples=200, deadline=None)
@given(status=STATUSES, headers=HEADERS, body=bodies())
def test_any_answer_is_classified_and_only_an_envelope_with_code_200_is_ok(status, headers, body):
    verdict = classify(status, httpx.Headers(headers), body)
    assert verdict.kind in (Kind.OK, Kind.TRANSIENT, Kind.PERMANENT, Kind.AUTH)
    if verdict.kind is Kind.OK:
        parsed = json.loads(body)
        assert 200 <= status < 300 and parsed["code"] == 200 and isinstance(parsed["message"], str)
    if verdict.kind is Kind.PERMANENT:
        assert verdict.envelope, "a permanent verdict needs the provider's own envelope"
    if verdict.kind is not Kind.OK:
        assert isinstance(verdict.error(), ProviderError)
        assert verdict.retry_after is None or 0 <= verdict.retry_after <= 3600


@settings(max_examples=200, deadline=None)
@given(status=STATUSES, headers=HEADERS, body=bodies())
def test_a_result_answer_is_definitive_only_when_the_envelope_says_the_task_does_not_exist(status, headers, body):
    answer = classify_result(PID, status, httpx.Headers(headers), body)
    assert isinstance(answer, (Prediction, ProviderError))
    if isinstance(answer, Prediction):
        assert answer.id == PID
    elif answer.definitive:
        parsed = json.loads(body)
        assert isinstance(answer, PermanentProviderError)
        assert parsed["code"] == 404 and isinstance(parsed["message"], str)
        assert "html" not in headers["content-type"].lower()


@settings(max_examples=200, deadline=None)
@given(status=STATUSES, headers=HEADERS, body=bodies())
def test_the_client_raises_only_provider_errors_whatever_the_result_answer(status, headers, body):
    client = client_with(lambda request: httpx.Response(status, headers=headers, content=body))
    try:
        client.result(PID)
    except ProviderError:
        pass


@settings(max_examples=200, deadline=None)
@given(status=st.integers(200, 299), headers=HEADERS, body=bodies())
def test_a_2xx_submit_answer_is_a_prediction_or_ambiguous_never_a_plain_retry(status, headers, body):
    # A 2xx means the provider may have created (and billed) a task: an unreadable one must go to
    # the reconciler, never straight back to the queue for a second paid submit.
    client = client_with(lambda request: httpx.Response(status, headers=headers, content=body))
    try:
        client.submit(REQUEST)
    except AmbiguousSubmitError:
        pass
    except ProviderError as exc:
        parsed = json.loads(body)  # only an envelope that answered an error code may skip the reconciler
        assert parsed["code"] != 200, exc


# --- result lookups: what a proxy says is not the provider's word ------------------------------


@pytest.mark.parametrize("status", [400, 403, 404, 410, 451])
def test_an_html_4xx_on_a_result_poll_is_transient(status):
    client = client_with(lambda request: httpx.Response(status, text=HTML_404, headers={"content-type": "text/html"}))
    with pytest.raises((TransientProviderError, ProviderAuthError)) as info:
        client.result(PID)
    assert not info.value.definitive


def test_a_proxys_own_json_404_is_not_the_provider_saying_the_task_is_gone():
    client = client_with(lambda request: httpx.Response(404, json={"message": "no Route matched with those values"}))
    with pytest.raises(TransientProviderError):
        client.result(PID)


def test_the_providers_envelope_404_says_the_task_does_not_exist():
    client = client_with(lambda request: httpx.Response(404, json=envelope(code=404, message=f"prediction {PID} not found")))
    with pytest.raises(PermanentProviderError) as info:
        client.result(PID)
    assert info.value.definitive


def test_another_envelope_4xx_on_a_result_poll_is_not_definitive():
    client = client_with(lambda request: httpx.Response(400, json=envelope(code=400, message="bad request")))
    with pytest.raises(PermanentProviderError) as info:
        client.result(PID)
    assert not info.value.definitive


@pytest.mark.parametrize(
    "body",
    [
        b'{"code": 200, "message": "success", "data": {"id": "a1b2c3", "status": "fail',  # truncated
        b"\x00\xff garbage \xfe",
        b'{"code": 200, "message": "success", "data": {"id": "other-task", "status": "failed"}}',  # another task's answer
        b'{"code": 200, "message": "success", "data": {"id": "../../x", "status": "failed"}}',
        b'{"code": 200, "message": "success", "data": {"id": "a1b2c3", "status": "completed", "outputs": 7}}',
        b'{"code": 200, "message": "success", "data": {"id": "a1b2c3", "status": "completed", "outputs": "https://x/y.png"}}',
        b'{"code": 200, "message": "success", "data": [1, 2]}',
        b"[]",
    ],
    ids=["truncated", "garbage", "other-id", "path-id", "outputs-int", "outputs-str", "data-list", "json-list"],
)
def test_garbage_truncated_or_foreign_result_answers_are_transient(body):
    client = client_with(lambda request: httpx.Response(200, content=body, headers={"content-type": "application/json"}))
    with pytest.raises(TransientProviderError):
        client.result(PID)


def test_an_endless_result_body_is_cut_off_at_the_cap():
    served = []

    def endless():
        while True:
            served.append(1)
            yield b"x" * 65536

    client = client_with(lambda request: httpx.Response(200, content=endless()), max_output_bytes=1024 * 1024)
    with pytest.raises(TransientProviderError, match="larger than"):
        client.result(PID)
    assert len(served) * 65536 <= client.max_answer_bytes + 2 * 65536


def test_an_endless_error_body_is_read_only_as_far_as_needed_to_classify_it():
    served = []

    def endless():
        yield HTML_404.encode()
        while True:
            served.append(1)
            yield b"<p>" * 20000

    client = client_with(lambda request: httpx.Response(404, content=endless(), headers={"content-type": "text/html"}))
    with pytest.raises(TransientProviderError):
        client.result(PID)
    assert len(served) * 60000 <= ERROR_BODY_LIMIT + 2 * 60000


@pytest.mark.timeout(20)
def test_a_slow_drip_answer_is_abandoned_at_the_calls_total_deadline():
    def drip():
        while True:
            time.sleep(0.05)
            yield b" "

    client = client_with(lambda request: httpx.Response(200, content=drip()), timeout=httpx.Timeout(0.5, connect=0.5))
    started = time.monotonic()
    with pytest.raises(TransientProviderError):
        client.result(PID)
    assert time.monotonic() - started < 2.0


# --- submits: an answered error is never ambiguous, an unreadable success always is ------------


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, text=HTML_404, headers={"content-type": "text/html"}),
        httpx.Response(400, text="<html>Request blocked</html>"),
        httpx.Response(502, text="<html>bad gateway</html>"),
        httpx.Response(429, json=envelope(code=429, message="rate limited"), headers={"retry-after": "1"}),
    ],
    ids=["html-404", "html-400", "html-502", "429"],
)
def test_an_answered_error_on_submit_is_transient_not_ambiguous_nor_permanent(answer):
    client = client_with(lambda request: answer)
    with pytest.raises(TransientProviderError) as info:
        client.submit(REQUEST)
    assert not isinstance(info.value, AmbiguousSubmitError)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>ok</html>",
        b'{"code": 200, "message": "success", "data": {"id": "new-1", "sta',
        b'{"code": 200, "message": "success", "data": {"status": "created"}}',
    ],
    ids=["html-200", "truncated", "no-id"],
)
def test_an_unreadable_2xx_submit_answer_is_ambiguous(body):
    client = client_with(lambda request: httpx.Response(200, content=body))
    with pytest.raises(AmbiguousSubmitError):
        client.submit(REQUEST)


# --- output downloads -------------------------------------------------------------------------


class Web:
    """A few hosts: each request is recorded; `routes[url]` answers it."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.seen.append(url)
        answer = self.routes.get(url, httpx.Response(404, text="no route"))
        return answer() if callable(answer) else answer


def redirect(to: str, status: int = 302) -> httpx.Response:
    return httpx.Response(status, headers={"location": to})


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://127.0.0.1:6379/",
        "http://10.0.0.7/internal.png",
        "http://[::ffff:169.254.169.254]/latest/",
        "http://[::1]:8080/",
        "http://user:pw@cdn.example.com/out.png",
        "file:///etc/passwd",
    ],
)
def test_a_redirect_to_a_private_address_is_refused_and_never_fetched(target):
    web = Web({"https://cdn.example.com/out/0.png": redirect(target)})
    client = client_with(web)
    with pytest.raises(PermanentProviderError, match="refused") as info:
        client.download("https://cdn.example.com/out/0.png", io.BytesIO())
    assert not info.value.definitive
    assert web.seen == ["https://cdn.example.com/out/0.png"]


def test_an_output_url_on_a_private_address_is_refused_before_any_request():
    web = Web({})
    client = client_with(web)
    with pytest.raises(PermanentProviderError, match="refused"):
        client.download("http://169.254.169.254/latest/meta-data/", io.BytesIO())
    assert web.seen == []


def test_a_trusted_local_sandbox_is_fetched_but_its_redirect_to_another_private_port_is_refused():
    sandbox = "http://127.0.0.1:8900"
    web = Web(
        {
            f"{sandbox}/outputs/p/0.png": httpx.Response(200, content=PNG, headers={"content-type": "image/png"}),
            f"{sandbox}/outputs/p/1.png": redirect("http://127.0.0.1:9999/latest/meta-data/"),
            f"{sandbox}/outputs/p/2.png": redirect("/outputs/p/0.png"),  # relative, same origin: fine
        }
    )
    client = WaveSpeedClient(KEY, sandbox, transport=httpx.MockTransport(web), url_guard=output_url_guard([sandbox]))
    sink = io.BytesIO()
    assert client.download(f"{sandbox}/outputs/p/0.png", sink) == "image/png" and sink.getvalue() == PNG
    with pytest.raises(PermanentProviderError, match="refused"):
        client.download(f"{sandbox}/outputs/p/1.png", io.BytesIO())
    assert "http://127.0.0.1:9999/latest/meta-data/" not in web.seen
    sink = io.BytesIO()
    client.download(f"{sandbox}/outputs/p/2.png", sink)
    assert sink.getvalue() == PNG


def test_a_public_redirect_chain_is_followed_but_not_forever():
    web = Web(
        {
            "https://cdn.example.com/a": redirect("https://cdn2.example.com/b", 301),
            "https://cdn2.example.com/b": redirect("https://storage.example.net/c", 307),
            "https://storage.example.net/c": httpx.Response(200, content=PNG, headers={"content-type": "image/png"}),
            "https://cdn.example.com/loop": redirect("https://cdn.example.com/loop"),
        }
    )
    client = client_with(web)
    sink = io.BytesIO()
    client.download("https://cdn.example.com/a", sink)
    assert sink.getvalue() == PNG
    with pytest.raises(TransientProviderError, match="redirected more than"):
        client.download("https://cdn.example.com/loop", io.BytesIO())
    assert web.seen.count("https://cdn.example.com/loop") <= 6


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json", "text/plain", "application/xml"])
def test_a_download_with_a_non_image_type_is_refused_without_reading_it(content_type):
    read = []

    def body():
        read.append(1)
        yield b"<html>hello</html>"

    web = Web({"https://cdn.example.com/o.png": lambda: httpx.Response(200, content=body(), headers={"content-type": content_type})})
    with pytest.raises(PermanentProviderError, match="not an image") as info:
        client_with(web).download("https://cdn.example.com/o.png", io.BytesIO())
    assert not info.value.definitive and read == []


def test_an_endless_download_stops_at_the_size_cap():
    def endless():
        while True:
            yield b"\x00" * 65536

    web = Web({"https://cdn.example.com/o.png": lambda: httpx.Response(200, content=endless(), headers={"content-type": "image/png"})})
    sink = io.BytesIO()
    with pytest.raises(PermanentProviderError, match="larger than"):
        client_with(web, max_output_bytes=256 * 1024).download("https://cdn.example.com/o.png", sink)
    assert len(sink.getvalue()) <= 256 * 1024


@pytest.mark.timeout(20)
def test_a_slow_drip_download_is_abandoned_at_the_total_deadline():
    def drip():
        while True:
            time.sleep(0.05)
            yield b"\x00" * 10

    web = Web({"https://cdn.example.com/o.png": lambda: httpx.Response(200, content=drip(), headers={"content-type": "image/png"})})
    started = time.monotonic()
    with pytest.raises(TransientProviderError, match="longer than"):
        client_with(web, download_timeout=0.5).download("https://cdn.example.com/o.png", io.BytesIO())
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("status", [400, 403, 404, 451])
def test_an_html_4xx_on_a_download_is_never_definitive(status):
    web = Web({"https://cdn.example.com/o.png": httpx.Response(status, text=HTML_404, headers={"content-type": "text/html"})})
    with pytest.raises(ProviderError) as info:
        client_with(web).download("https://cdn.example.com/o.png", io.BytesIO())
    assert not info.value.definitive
    assert not isinstance(info.value, ProviderAuthError)  # a CDN's 403 is about the URL, not the key


def test_an_endless_error_page_on_a_download_is_read_only_to_the_error_cap():
    served = []

    def endless():
        while True:
            served.append(1)
            yield b"<p>" * 20000

    web = Web({"https://cdn.example.com/o.png": lambda: httpx.Response(503, content=endless(), headers={"content-type": "text/html"})})
    with pytest.raises(TransientProviderError):
        client_with(web).download("https://cdn.example.com/o.png", io.BytesIO())
    assert len(served) * 60000 <= ERROR_BODY_LIMIT + 2 * 60000
