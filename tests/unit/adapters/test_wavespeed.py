"""Specification of the WaveSpeed client: request shape, envelope parsing, the error taxonomy
(transient / permanent / auth / ambiguous) and that the API key never leaks."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from worker.adapters.wavespeed import (
    MODEL,
    SUBMIT_PATH,
    EditRequest,
    Prediction,
    PredictionStatus,
    WaveSpeedClient,
    parse_retry_after,
    prediction_error,
)
from worker.errors import (
    AmbiguousSubmitError,
    PermanentProviderError,
    ProviderAuthError,
    ProviderError,
    TransientProviderError,
)

KEY = "ws-secret-0123456789abcdef"
BASE = "https://api.wavespeed.test"

FULL = {
    "code": 200,
    "message": "success",
    "data": {
        "id": "a1b2c3",
        "model": MODEL,
        "outputs": ["https://cdn.example.com/out/0.png"],
        "urls": {"get": f"{BASE}/api/v3/predictions/a1b2c3/result"},
        "has_nsfw_contents": [True],
        "status": "completed",
        "created_at": "2025-03-01T10:20:30.123Z",
        "error": "",
        "timings": {"inference": 4321},
    },
}

REQUEST = EditRequest(
    prompt="make the sky purple",
    image="https://images.example.com/cat.png",
    size="1024*768",
    seed=99,
    enable_base64_output=True,
    enable_sync_mode=False,
)


class Wire:
    """A scripted transport: answers each request with the next response (or raises the next error)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def client_for(*answers, key: str | None = KEY) -> tuple[WaveSpeedClient, Wire]:
    wire = Wire(*answers)
    return WaveSpeedClient(key, BASE, transport=httpx.MockTransport(wire)), wire


def ok(data=None, **kw) -> httpx.Response:
    return httpx.Response(200, json=FULL if data is None else {"code": 200, "message": "success", "data": data}, **kw)


def error(status: int, message: str = "boom", code: int | None = None, **kw) -> httpx.Response:
    return httpx.Response(status, json={"code": code if code is not None else status, "message": message}, **kw)


# --- parsing --------------------------------------------------------------------------------


def test_a_full_envelope_is_parsed_into_a_prediction():
    client, _ = client_for(ok())
    p = client.result("a1b2c3")
    assert p.id == "a1b2c3"
    assert p.status is PredictionStatus.COMPLETED and p.status.terminal
    assert p.model == MODEL
    assert p.outputs == ["https://cdn.example.com/out/0.png"]
    assert p.has_nsfw_contents == [True]
    assert p.created_at == datetime(2025, 3, 1, 10, 20, 30, 123000, tzinfo=timezone.utc)
    assert p.error is None  # "" means no error
    assert p.get_url == f"{BASE}/api/v3/predictions/a1b2c3/result"
    assert p.inference_ms == 4321


def test_a_failed_task_carries_its_error():
    client, _ = client_for(ok({**FULL["data"], "status": "failed", "outputs": [], "error": "image rejected by moderation"}))
    p = client.result("a1b2c3")
    assert p.status is PredictionStatus.FAILED and p.error == "image rejected by moderation"


@pytest.mark.parametrize(
    "status, terminal",
    [
        ("created", False),
        ("processing", False),
        ("completed", True),
        ("failed", True),
        ("cancelled", True),
        ("timeout", True),
        ("deleted", True),
        ("COMPLETED", True),
    ],
)
def test_statuses_are_parsed_and_classified(status, terminal):
    client, _ = client_for(ok({"id": "x", "status": status}))
    assert client.result("x").status.terminal is terminal


def test_an_unknown_status_is_transient():
    client, _ = client_for(ok({"id": "x", "status": "teleporting"}))
    with pytest.raises(TransientProviderError, match="unknown task status"):
        client.result("x")


def test_a_prediction_without_an_id_is_transient():
    client, _ = client_for(ok({"status": "processing"}))
    with pytest.raises(TransientProviderError):
        client.result("x")


def test_a_naive_created_at_is_taken_as_utc():
    client, _ = client_for(ok({"id": "x", "status": "created", "created_at": "2025-03-01T10:20:30"}))
    assert client.result("x").created_at == datetime(2025, 3, 1, 10, 20, 30, tzinfo=timezone.utc)


def test_prediction_repr_does_not_dump_outputs():
    p = Prediction.from_data({"id": "x", "status": "completed", "outputs": ["A" * 10_000]})
    assert len(repr(p)) < 200


# --- the requests ---------------------------------------------------------------------------


def test_submit_posts_all_six_parameters_with_the_bearer_header():
    client, wire = client_for(ok({"id": "new-1", "status": "created"}))
    p = client.submit(REQUEST)
    assert p.id == "new-1" and p.status is PredictionStatus.CREATED
    [req] = wire.requests
    assert req.method == "POST"
    assert str(req.url) == f"{BASE}{SUBMIT_PATH}" == f"{BASE}/api/v3/bytedance/dreamina-v3.0/edit"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.content) == {
        "prompt": "make the sky purple",
        "image": "https://images.example.com/cat.png",
        "size": "1024*768",
        "seed": 99,
        "enable_base64_output": True,
        "enable_sync_mode": False,
    }


def test_result_gets_the_prediction_result_path():
    client, wire = client_for(ok())
    client.result("a1b2c3")
    assert wire.requests[0].method == "GET"
    assert wire.requests[0].url.path == "/api/v3/predictions/a1b2c3/result"
    assert wire.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_cancel_deletes_the_prediction():
    client, wire = client_for(ok(None))
    client.cancel("a1b2c3")
    assert (wire.requests[0].method, wire.requests[0].url.path) == ("DELETE", "/api/v3/predictions/a1b2c3")


def test_list_predictions_sends_the_filters_and_parses_the_items():
    items = [{**FULL["data"], "id": "p2", "status": "processing", "outputs": []}, {**FULL["data"], "id": "p1"}]
    client, wire = client_for(ok({"page": 2, "total": 102, "items": items}))
    after = datetime(2025, 3, 1, 10, 0, 0, tzinfo=timezone.utc)
    before = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone(timedelta(hours=2)))  # 10:00 UTC
    page = client.list_predictions(page=2, page_size=500, status="processing", created_after=after, created_before=before)
    [req] = wire.requests
    assert (req.method, req.url.path) == ("POST", "/api/v3/predictions")
    assert json.loads(req.content) == {
        "page": 2,
        "page_size": 100,  # the provider's maximum
        "model": MODEL,
        "status": "processing",
        "created_after": "2025-03-01T10:00:00Z",
        "created_before": "2025-03-01T10:00:00Z",
    }
    assert (page.page, page.total) == (2, 102)
    assert [p.id for p in page.items] == ["p2", "p1"]
    assert page.items[0].status is PredictionStatus.PROCESSING


def test_list_predictions_of_an_empty_account():
    client, _ = client_for(ok({"page": 1, "total": 0, "items": []}))
    page = client.list_predictions()
    assert page.items == [] and page.total == 0


# --- error taxonomy -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_auth_errors(status):
    client, _ = client_for(error(status, "insufficient credit"))
    with pytest.raises(ProviderAuthError) as info:
        client.submit(REQUEST)
    assert info.value.status_code == status
    assert not isinstance(info.value, (TransientProviderError, PermanentProviderError))


def test_429_is_transient_and_carries_retry_after():
    client, _ = client_for(error(429, "rate limited", headers={"Retry-After": "17"}))
    with pytest.raises(TransientProviderError) as info:
        client.submit(REQUEST)
    assert info.value.retry_after == 17.0
    assert info.value.status_code == 429
    assert not isinstance(info.value, AmbiguousSubmitError)  # the provider refused: no task exists


def test_429_retry_after_as_an_http_date():
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    client, _ = client_for(error(429, headers={"Retry-After": when.strftime("%a, %d %b %Y %H:%M:%S GMT")}))
    with pytest.raises(TransientProviderError) as info:
        client.result("x")
    assert 100 <= info.value.retry_after <= 121


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_5xx_are_transient(status):
    client, _ = client_for(error(status))
    with pytest.raises(TransientProviderError) as info:
        client.submit(REQUEST)
    assert info.value.status_code == status
    assert not isinstance(info.value, AmbiguousSubmitError)


@pytest.mark.parametrize("status", [200, 502])
def test_an_html_page_is_transient_even_with_200(status):
    page = "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
    client, _ = client_for(httpx.Response(status, text=page, headers={"content-type": "text/html; charset=utf-8"}))
    with pytest.raises(TransientProviderError, match="HTML"):
        client.result("x")


def test_an_html_body_without_an_html_content_type_is_still_transient():
    client, _ = client_for(
        httpx.Response(200, content=b"  <html><body>maintenance</body></html>", headers={"content-type": "application/json"})
    )
    with pytest.raises(TransientProviderError):
        client.submit(REQUEST)


def test_a_body_that_is_not_json_is_transient():
    client, _ = client_for(httpx.Response(200, content=b"not json at all", headers={"content-type": "application/json"}))
    with pytest.raises(TransientProviderError, match="not JSON"):
        client.result("x")


def test_400_is_permanent_with_the_providers_message():
    client, _ = client_for(error(400, "size must be between 512 and 2048"))
    with pytest.raises(PermanentProviderError) as info:
        client.submit(REQUEST)
    assert "size must be between 512 and 2048" in str(info.value)
    assert "size must be between 512 and 2048" in info.value.message
    assert info.value.code == 400 and info.value.status_code == 400


@pytest.mark.parametrize("code", [1200, 1402])
def test_envelope_codes_for_moderation_and_unreachable_media_are_permanent(code):
    client, _ = client_for(httpx.Response(200, json={"code": code, "message": "refused", "data": None}))
    with pytest.raises(PermanentProviderError) as info:
        client.submit(REQUEST)
    assert info.value.code == code


@pytest.mark.parametrize("code", [1200, 1402])
def test_envelope_codes_on_a_400_keep_the_providers_code(code):
    client, _ = client_for(error(400, "media unreachable", code=code))
    with pytest.raises(PermanentProviderError) as info:
        client.submit(REQUEST)
    assert info.value.code == code


def test_an_envelope_code_500_on_http_200_is_transient():
    client, _ = client_for(httpx.Response(200, json={"code": 500, "message": "internal", "data": None}))
    with pytest.raises(TransientProviderError):
        client.result("x")


def test_a_failed_task_becomes_a_permanent_error_with_the_providers_message():
    p = Prediction(id="x", status=PredictionStatus.FAILED, error="NSFW content detected")
    err = prediction_error(p)
    assert isinstance(err, PermanentProviderError)
    assert err.message == "NSFW content detected" and err.code == "task_failed"


def test_a_timed_out_task_without_a_message_still_says_what_happened():
    err = prediction_error(Prediction(id="x", status=PredictionStatus.TIMEOUT))
    assert isinstance(err, PermanentProviderError)
    assert "timeout" in err.message and err.code == "task_timeout"


# --- transport failures ---------------------------------------------------------------------


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow dns")])
def test_a_connect_failure_on_submit_is_transient_but_not_ambiguous(exc):
    client, _ = client_for(exc)
    with pytest.raises(TransientProviderError) as info:
        client.submit(REQUEST)
    assert not isinstance(info.value, AmbiguousSubmitError)  # nothing reached the provider


@pytest.mark.parametrize("exc", [httpx.ReadTimeout("read timed out"), httpx.RemoteProtocolError("peer closed"), httpx.WriteTimeout("w")])
def test_a_timeout_after_sending_a_submit_is_ambiguous(exc):
    client, _ = client_for(exc)
    with pytest.raises(AmbiguousSubmitError):
        client.submit(REQUEST)


def test_a_read_timeout_on_result_is_transient_not_ambiguous():
    client, _ = client_for(httpx.ReadTimeout("read timed out"))
    with pytest.raises(TransientProviderError) as info:
        client.result("x")
    assert not isinstance(info.value, AmbiguousSubmitError)


def test_a_read_timeout_on_list_is_transient_not_ambiguous():
    client, _ = client_for(httpx.ReadTimeout("read timed out"))
    with pytest.raises(TransientProviderError) as info:
        client.list_predictions()
    assert not isinstance(info.value, AmbiguousSubmitError)


# --- downloads ------------------------------------------------------------------------------


def test_a_download_streams_the_bytes_and_sends_no_authorization_header():
    body = b"\x89PNG\r\n\x1a\n" + b"x" * 1000
    client, wire = client_for(httpx.Response(200, content=body, headers={"content-type": "image/png; charset=binary"}))
    sink = io.BytesIO()
    assert client.download("https://cdn.example.com/out/0.png", sink) == "image/png"
    assert sink.getvalue() == body
    [req] = wire.requests
    assert "authorization" not in req.headers
    assert KEY not in str(req.headers) and KEY not in str(req.url)


def test_a_download_404_is_permanent():
    client, _ = client_for(httpx.Response(404, text="gone"))
    with pytest.raises(PermanentProviderError):
        client.download("https://cdn.example.com/out/0.png", io.BytesIO())


@pytest.mark.parametrize("status", [401, 403])
def test_a_forbidden_or_expired_output_url_is_permanent_not_an_auth_error(status):
    # No credentials go to the CDN, so a 401/403 there is about the URL (expired), not the API key:
    # it must not trip the breaker, and retrying the same URL cannot help.
    client, _ = client_for(
        httpx.Response(status, text="<Error><Code>AccessDenied</Code></Error>", headers={"content-type": "application/xml"})
    )
    with pytest.raises(PermanentProviderError):
        client.download("https://cdn.example.com/out/0.png", io.BytesIO())


def test_a_redirected_output_url_is_followed_to_the_bytes():
    body = b"\x89PNG\r\n\x1a\n" + b"y" * 100

    def cdn(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/out/0.png":
            return httpx.Response(302, headers={"location": "https://storage.example.net/real/0.png"})
        return httpx.Response(200, content=body, headers={"content-type": "image/png"})

    client = WaveSpeedClient(KEY, BASE, transport=httpx.MockTransport(cdn))
    sink = io.BytesIO()
    assert client.download("https://cdn.example.com/out/0.png", sink) == "image/png"
    assert sink.getvalue() == body


def test_a_download_503_is_transient():
    client, _ = client_for(httpx.Response(503, text="busy"))
    with pytest.raises(TransientProviderError):
        client.download("https://cdn.example.com/out/0.png", io.BytesIO())


def test_a_download_over_the_limit_is_refused():
    client, _ = client_for(httpx.Response(200, content=b"x" * 5000))
    with pytest.raises(PermanentProviderError, match="larger than"):
        client.download("https://cdn.example.com/out/0.png", io.BytesIO(), max_bytes=4096)


def test_a_broken_download_is_transient():
    client, _ = client_for(httpx.ReadTimeout("stalled"))
    with pytest.raises(TransientProviderError):
        client.download("https://cdn.example.com/out/0.png", io.BytesIO())


# --- secrets --------------------------------------------------------------------------------


def test_the_api_key_is_not_in_the_clients_repr():
    client, _ = client_for(ok())
    assert KEY not in repr(client) and "***" in repr(client)
    assert KEY not in repr(REQUEST)


LEAKY_ANSWERS = [
    error(401, f"invalid api key {KEY}"),
    error(403, f"key {KEY} has no credit"),
    error(400, f"bad request for Bearer {KEY}"),
    error(429, f"slow down {KEY}"),
    error(500, f"trace: Authorization: Bearer {KEY}"),
    httpx.Response(500, text=f"Internal error, key={KEY}", headers={"content-type": "text/plain"}),
    httpx.Response(200, json={"code": 1200, "message": f"moderation for {KEY}", "data": None}),
    httpx.Response(200, json={"code": 401, "message": f"auth {KEY}", "data": None}),
]


@pytest.mark.parametrize("answer", LEAKY_ANSWERS, ids=lambda r: f"{r.status_code}")
def test_the_api_key_never_appears_in_an_error_even_when_the_provider_echoes_it(answer):
    client, _ = client_for(answer)
    for call in (lambda: client.submit(REQUEST), lambda: client.result("x"), lambda: client.list_predictions()):
        with pytest.raises(ProviderError) as info:
            call()
        exc = info.value
        for text in (str(exc), repr(exc), exc.message, str(exc.args), str(exc.code)):
            assert KEY not in text


def test_the_api_key_never_appears_in_a_failed_tasks_error():
    client, _ = client_for(ok({"id": "x", "status": "failed", "error": f"upstream rejected key {KEY}"}))
    prediction = client.result("x")
    err = prediction_error(prediction)
    assert KEY not in str(err) and KEY not in (prediction.error or "")


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("timeout")])
def test_transport_errors_do_not_leak_the_key(exc):
    client, _ = client_for(exc)
    with pytest.raises(ProviderError) as info:
        client.submit(REQUEST)
    assert KEY not in str(info.value) and KEY not in repr(info.value)


def test_without_a_key_no_authorization_header_is_sent():
    client, wire = client_for(ok(), key=None)
    client.result("a1b2c3")
    assert "authorization" not in wire.requests[0].headers
    assert "api_key=None" in repr(client)


def test_parse_retry_after():
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("soon") is None


# --- the call observer (metrics) ---------------------------------------------------------------


def test_every_call_reports_its_operation_and_outcome():
    calls: list[tuple[str, str]] = []
    wire = Wire(ok(), error(503), error(401), httpx.ReadTimeout("slow"), error(400))
    client = WaveSpeedClient(KEY, BASE, transport=httpx.MockTransport(wire), on_call=lambda op, outcome: calls.append((op, outcome)))

    client.submit(REQUEST)
    for _ in range(2):
        with pytest.raises(ProviderError):
            client.result("a1b2c3")
    with pytest.raises(AmbiguousSubmitError):
        client.submit(REQUEST)
    with pytest.raises(ProviderError):
        client.cancel("a1b2c3")

    assert calls == [("submit", "ok"), ("result", "transient"), ("result", "auth"), ("submit", "ambiguous"), ("cancel", "permanent")]
