"""Specification of the HTTP API: job creation (image rules, idempotency, one JSON error shape),
reads, cancel and retry, the signed WaveSpeed webhook receiver, metrics and the health check.

Everything real runs — SQLite migrated by Alembic, the pipeline, the WaveSpeed client over
`httpx.MockTransport` — only the broker is a RecordingPublisher and DNS an injected resolver.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import time
import uuid
import warnings
from datetime import timedelta

import pytest
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import func, select

with warnings.catch_warnings():
    # Starlette's TestClient warns about httpx at import time; irrelevant to these tests.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from models import Job, Outbox
from worker.adapters.telemetry import flush
from worker.api import create_app
from worker.config import Settings
from worker.core import jobs, tenants
from worker.engine import poller, submit
from worker.metrics import TotalsCollector

JOB_KEYS = {
    "id",
    "state",
    "prompt",
    "size",
    "seed",
    "idempotency_key",
    "prediction_id",
    "attempts",
    "outputs",
    "has_nsfw_contents",
    "error",
    "created_at",
    "updated_at",
    "finished_at",
    "tenant",
    "priority",
    "callback_url",
    "output_urls",
    "paid_submissions",
    "cost",
}
PUBLIC_URL = "https://images.example.com/cat.png"
WEBHOOK_SECRET = "whsec_test-unit-not-a-secret"

# Names the injected resolver knows; IP literals resolve to themselves, as getaddrinfo does.
DNS = {"images.example.com": ["93.184.216.34"], "intranet.example.com": ["10.1.2.3"], "metadata.example.com": ["169.254.169.254"]}


def resolver(host: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        return DNS[host]


def b64_image(fmt: str = "PNG", size: tuple[int, int] = (8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).convert("P" if fmt == "GIF" else "RGB").save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def body(**overrides) -> dict:
    payload = {"image": b64_image(), "prompt": "make the sky purple"}
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def with_secret(settings: Settings, monkeypatch, secret: str | None) -> Settings:
    """Configure the webhook secret (WAVESPEED_WEBHOOK_SECRET in production)."""
    return settings.model_copy(update={"webhook_secret": SecretStr(secret) if secret else None})


@pytest.fixture
def admin_key(sessions) -> str:
    """An admin key of tenant `default` (every route but the webhook and health needs a key)."""
    return tenants.create_key(sessions, "default", admin=True).key.get_secret_value()


@pytest.fixture
def make_client(settings, deps, publisher, monkeypatch, admin_key):
    def make(
        *, secret: str | None = WEBHOOK_SECRET, app_settings: Settings | None = None, storage=None, key: str | None = None
    ) -> TestClient:
        app = create_app(
            with_secret(app_settings or settings, monkeypatch, secret),
            deps_factory=lambda: deps,
            publisher=publisher,
            url_resolver=resolver,
            storage=storage or deps.storage,
            metrics_totals=TotalsCollector(
                deps.metrics_totals, fleet=deps.fleet, breaker=deps.breaker, limiter=deps.limiter, max_concurrency=4, rate_per_minute=60
            ),
        )
        return TestClient(app, headers={"Authorization": f"Bearer {key or admin_key}"})

    return make


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def count(sessions, model) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def assert_error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error"}
    assert payload["error"]["code"] == code
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    return payload["error"]["message"]


def create(client: TestClient, **overrides) -> dict:
    response = client.post("/jobs", json=body(**overrides))
    assert response.status_code == 201, response.text
    return response.json()


def processing_job(client: TestClient, deps) -> dict:
    """A job the pipeline has submitted to the (fake) provider: processing, with a prediction id."""
    job = create(client)
    submit.run_submit(deps, job["id"])
    job = client.get(f"/jobs/{job['id']}").json()
    assert job["state"] == "processing" and job["prediction_id"]
    return job


# --- POST /jobs ---------------------------------------------------------------------------------


def test_create_answers_201_with_exactly_the_contract_job_json_and_publishes_the_submit(client, publisher, sessions):
    response = client.post("/jobs", json=body(size="1024*768", seed=7, idempotency_key="order-1"))

    assert response.status_code == 201
    job = response.json()
    assert set(job) == JOB_KEYS
    assert job["state"] == "queued"
    assert (job["prompt"], job["size"], job["seed"], job["idempotency_key"]) == ("make the sky purple", "1024*768", 7, "order-1")
    assert (job["prediction_id"], job["attempts"], job["outputs"], job["error"], job["finished_at"]) == (None, 0, [], None, None)
    assert job["created_at"].endswith("Z")
    assert publisher.sent == [("submit", job["id"], 0.0, None)]
    assert count(sessions, Job) == 1


def test_create_defaults_size_and_seed_like_the_provider(client):
    job = create(client)
    assert (job["size"], job["seed"]) == ("1328*1328", -1)


@pytest.mark.parametrize(
    "image",
    [
        b64_image("PNG"),
        b64_image("JPEG"),
        b64_image("WEBP"),
        "data:image/png;base64," + b64_image("PNG"),
        "data:image/jpeg;base64," + b64_image("JPEG"),
        # Line-wrapped base64 (what `base64` the tool prints) is still base64.
        "\n".join(b64_image("PNG")[i : i + 76] for i in range(0, len(b64_image("PNG")), 76)),
    ],
)
def test_base64_images_are_decoded_checked_and_stored_in_s3_not_in_the_row(client, sessions, s3, image):
    job = create(client, image=image)

    stored = jobs.get_job(sessions, job["id"], with_payloads=True)
    key = f"edits/inputs/sha256-{stored.image_sha256}"
    obj = s3.get_object(Bucket="edit-worker-unit", Key=key)
    data, mime = obj["Body"].read(), obj["ContentType"]
    assert mime in ("image/png", "image/jpeg", "image/webp")
    assert data[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"RIFF")
    assert stored.image_ref == f"base64:{mime}:sha256={hashlib.sha256(data).hexdigest()[:16]}"
    assert (stored.image_uri, stored.image_sha256) == (f"s3://edit-worker-unit/{key}", hashlib.sha256(data).hexdigest())
    assert stored.image_payload is None


def test_a_public_image_url_is_passed_through_unchanged(client, sessions, list_keys):
    job = create(client, image=PUBLIC_URL)

    stored = jobs.get_job(sessions, job["id"], with_payloads=True)
    assert (stored.image_ref, stored.image_uri, stored.image_payload) == (PUBLIC_URL, PUBLIC_URL, None)
    assert list_keys() == []  # the provider fetches it: nothing to store


def test_s3_down_at_admission_answers_503_with_retry_after_and_writes_nothing(make_client, down_storage, sessions, publisher):
    client = make_client(storage=down_storage)

    response = client.post("/jobs", json=body(idempotency_key="order-7"))

    message = assert_error(response, 503, "unavailable")
    assert "storage" in message and "super-secret-s3-key" not in response.text and "127.0.0.1" not in response.text
    assert int(response.headers["retry-after"]) > 0
    assert count(sessions, Job) == 0 and count(sessions, Outbox) == 0
    assert publisher.sent == []
    # A URL input needs no S3: still admitted.
    assert client.post("/jobs", json=body(image=PUBLIC_URL)).status_code == 201


def test_the_same_idempotency_key_answers_200_with_the_same_job_and_writes_one_row(client, publisher, sessions):
    first = client.post("/jobs", json=body(idempotency_key="order-42"))
    second = client.post("/jobs", json=body(idempotency_key="order-42"))

    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == first.json()
    assert count(sessions, Job) == 1
    assert count(sessions, Outbox) == 1
    assert [step for step, *_ in publisher.sent] == ["submit"]


def test_a_local_file_path_is_refused_and_the_file_is_never_read(client, sessions, publisher, png_file):
    # A real, valid image on the server's disk: the CLI would send it, the HTTP API must not.
    for image in (str(png_file), f"file://{png_file}", "/etc/passwd", "../../etc/passwd", "~/.ssh/id_rsa"):
        message = assert_error(client.post("/jobs", json=body(image=image)), 422, "invalid_input")
        assert "image" in message or "file" in message
    assert count(sessions, Job) == 0
    assert publisher.sent == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt": "x" * 121}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 12}, "prompt"),
        ({"size": "511*1024"}, "size"),
        ({"size": "1024x1024"}, "size"),
        ({"seed": -2}, "seed"),
        ({"seed": 2_147_483_648}, "seed"),
        ({"seed": "seven"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"idempotency_key": "k" * 256}, "idempotency key"),
        ({"image": None}, "image"),
        ({"image": ""}, "image"),
        ({"image": "this is not base64 at all!"}, "image"),
        ({"image": base64.b64encode(b"just some text, not an image").decode()}, "image"),
        ({"image": b64_image("GIF")}, "GIF"),
        ({"image": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()}, "image"),
        ({"image": "data:text/plain;base64,aGVsbG8="}, "data:image"),
        ({"image": "data:image/png," + b64_image()}, "data:image"),
        ({"image": base64.b64encode(b"\0" * (1024 * 1024 + 1)).decode()}, "limit"),
        ({"image": "http://127.0.0.1/cat.png"}, "private address"),
        ({"image": "http://intranet.example.com/cat.png"}, "private address"),
        ({"image": "http://metadata.example.com/latest/meta-data"}, "private address"),
        ({"image": "ftp://images.example.com/cat.png"}, "http"),
        ({"image": "https://user:pw@images.example.com/cat.png"}, "credentials"),
        ({"sead": 5}, "sead"),
    ],
)
def test_invalid_requests_answer_422_json_naming_the_field_and_write_nothing(client, sessions, publisher, overrides, field):
    response = client.post("/jobs", json=body(**overrides))

    message = assert_error(response, 422, "invalid_input")
    assert field in message
    assert count(sessions, Job) == 0
    assert count(sessions, Outbox) == 0
    assert publisher.sent == []


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_answers_422_json(client, sessions, raw):
    response = client.post("/jobs", content=raw, headers={"content-type": "application/json"})

    assert_error(response, 422, "invalid_input")
    assert count(sessions, Job) == 0


def test_an_oversized_body_is_refused_before_it_is_parsed(client, sessions):
    response = client.post("/jobs", content=b"x" * (2 * 1024 * 1024), headers={"content-type": "application/json"})

    assert "limit" in assert_error(response, 413, "invalid_input")
    assert count(sessions, Job) == 0


def chunks(total: int, size: int = 64 * 1024):
    """A body sent chunked (Transfer-Encoding: chunked): no Content-Length to check up front."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b" " * piece


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(client, sessions):
    # No Content-Length: the old check (the header only) let 2.6 MB through to the JSON parser.
    response = client.post("/jobs", content=chunks(2_600_000), headers={"content-type": "application/json"})

    assert "limit" in assert_error(response, 413, "invalid_input")
    assert count(sessions, Job) == 0


def test_a_chunked_body_under_the_limit_is_taken(client):
    raw = json.dumps(body()).encode()
    response = client.post("/jobs", content=iter([raw[:100], raw[100:]]), headers={"content-type": "application/json"})

    assert response.status_code == 201, response.text


def test_a_webhook_body_over_its_own_limit_is_refused_before_it_is_verified(make_client, settings, publisher):
    client = make_client(app_settings=settings.model_copy(update={"webhook_max_bytes": 4096}))
    raw, headers = signed(prediction("pred-0001") | {"padding": "x" * 8000})
    headers.pop("content-type")

    assert_error(client.post("/webhooks/wavespeed", content=iter([raw]), headers=headers), 413, "invalid_input")
    assert_error(client.post("/webhooks/wavespeed", content=raw, headers=headers), 413, "invalid_input")
    assert publisher.sent == []


def test_a_png_claiming_20000_by_20000_pixels_answers_422(client, sessions, decompression_bomb):
    response = client.post("/jobs", json=body(image=base64.b64encode(decompression_bomb).decode()))

    assert "pixels" in assert_error(response, 422, "invalid_input")
    assert count(sessions, Job) == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt": "make the sky\x00 purple"}, "prompt"),
        ({"prompt": "make the sky \ud800 purple"}, "prompt"),
        ({"idempotency_key": "order\x00-1"}, "idempotency key"),
        ({"idempotency_key": "order-\udc80"}, "idempotency key"),
        ({"size": "1024\x00*1024"}, "size"),
        ({"image": "https://images.example.com/\ud800.png"}, "image"),
        ({"image": "http://images.example.com:99999/cat.png"}, "image"),
    ],
)
def test_nul_bytes_and_lone_surrogates_answer_422_not_a_database_error(client, sessions, publisher, overrides, field):
    # Before: NUL answered 503 "database unavailable" on PostgreSQL (inviting retries) and a lone
    # surrogate 500 (no database can encode it). json.dumps escapes them (\\u0000, \\ud800), as a client would.
    response = client.post("/jobs", content=json.dumps(body(**overrides)), headers={"content-type": "application/json"})

    assert field in assert_error(response, 422, "invalid_input")
    assert count(sessions, Job) == 0
    assert publisher.sent == []


def test_a_database_refusing_a_value_answers_422_not_503(make_client, settings, monkeypatch):
    from sqlalchemy.exc import DataError

    client = make_client()

    def refuse(*_args, **_kwargs):
        raise DataError("INSERT ...", {}, ValueError("A string literal cannot contain NUL (0x00) characters."))

    from worker import producer

    monkeypatch.setattr(producer, "create_jobs", refuse)
    assert_error(client.post("/jobs", json=body()), 422, "invalid_input")


@pytest.mark.parametrize("job_id", ["a%00b", "x" * 37, "\u00e9t\u00e9", "%ED%A0%80", "%FF"])
def test_job_ids_that_cannot_be_ids_answer_404(client, job_id):
    assert_error(client.get(f"/jobs/{job_id}"), 404, "not_found")


def test_private_urls_are_accepted_when_the_setting_allows_them(make_client, settings):
    client = make_client(app_settings=settings.model_copy(update={"allow_private_urls": True}))

    assert create(client, image="http://intranet.example.com/cat.png")["state"] == "queued"


# --- reads --------------------------------------------------------------------------------------


def test_get_job_and_its_events(client):
    job = create(client)

    assert client.get(f"/jobs/{job['id']}").json() == job
    events = client.get(f"/jobs/{job['id']}/events").json()
    assert [(e["from"], e["to"], e["reason"]) for e in events] == [(None, "queued", "created")]
    assert events[0]["at"].endswith("Z")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/jobs/no-such-job"),
        ("GET", "/jobs/no-such-job/events"),
        ("POST", "/jobs/no-such-job/cancel"),
        ("POST", "/jobs/no-such-job/retry"),
        ("GET", "/no/such/route"),
    ],
)
def test_unknown_jobs_and_routes_answer_404_json(client, method, path):
    assert_error(client.request(method, path), 404, "not_found")


def test_list_filters_by_state_newest_first_with_limit_and_offset(client):
    first, second, third = create(client), create(client), create(client)
    client.post(f"/jobs/{second['id']}/cancel")

    assert [j["id"] for j in client.get("/jobs").json()["jobs"]] == [third["id"], second["id"], first["id"]]
    assert [j["id"] for j in client.get("/jobs?state=cancelled").json()["jobs"]] == [second["id"]]
    assert [j["id"] for j in client.get("/jobs", params={"state": "queued"}).json()["jobs"]] == [third["id"], first["id"]]
    assert [j["id"] for j in client.get("/jobs?limit=1&offset=1").json()["jobs"]] == [second["id"]]
    assert set(client.get("/jobs").json()["jobs"][0]) == JOB_KEYS


def test_list_pages_by_cursor_newest_first_until_next_cursor_is_null(client):
    made = [create(client)["id"] for _ in range(5)]
    client.post(f"/jobs/{made[1]}/cancel")

    seen, cursor, pages = [], None, 0
    while True:
        page = client.get("/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert set(page) == {"jobs", "next_cursor"}
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]
    assert pages == 3
    # With a state filter too.
    queued = client.get("/jobs", params={"state": "queued", "limit": 3}).json()
    rest = client.get("/jobs", params={"state": "queued", "limit": 3, "cursor": queued["next_cursor"]}).json()
    assert [j["id"] for j in queued["jobs"] + rest["jobs"]] == [i for i in made[::-1] if i != made[1]]
    assert rest["next_cursor"] is None


def test_the_list_query_seeks_the_created_at_id_index(client, sessions):
    from sqlalchemy import text

    create(client)
    with sessions() as session:
        [(plan,)] = [
            (row[-1],) for row in session.execute(text("EXPLAIN QUERY PLAN SELECT * FROM jobs ORDER BY created_at DESC, id DESC LIMIT 3"))
        ]
    assert "ix_jobs_created_at_id" in plan


@pytest.mark.parametrize(
    "query",
    [
        "state=bogus",
        "limit=0",
        "limit=abc",
        "offset=-1",
        "offset=1e20",
        f"offset={10**20}",
        "offset=10001",
        "cursor=bogus",
        "cursor=%00",
        "limit=1001",
    ],
)
def test_bad_list_parameters_answer_422_json(client, query):
    assert_error(client.get(f"/jobs?{query}"), 422, "invalid_input")


# --- cancel and retry ---------------------------------------------------------------------------


def test_cancel_a_processing_job_cancels_it_at_the_provider_too(client, deps, fake_provider):
    job = processing_job(client, deps)

    response = client.post(f"/jobs/{job['id']}/cancel")

    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert fake_provider.cancelled == [job["prediction_id"]]
    # Cancelling again is a no-op, not an error.
    assert client.post(f"/jobs/{job['id']}/cancel").json()["state"] == "cancelled"


def test_cancel_a_finished_job_answers_409(client, deps, drive):
    job = create(client)
    drive(job["id"])
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "succeeded"

    assert_error(client.post(f"/jobs/{job['id']}/cancel"), 409, "invalid_operation")
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "succeeded"


def test_retry_of_a_job_that_has_not_failed_answers_409(client):
    job = create(client)

    assert "only failed jobs" in assert_error(client.post(f"/jobs/{job['id']}/retry"), 409, "invalid_operation")
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "queued"


def test_retry_of_a_failed_job_requeues_it_and_publishes_the_submit(client, deps, drive, fake_provider, publisher):
    fake_provider.auto_outcome = "failed"
    job = create(client)
    drive(job["id"])
    failed = client.get(f"/jobs/{job['id']}").json()
    assert failed["state"] == "failed" and failed["error"]["code"] == "task_failed"
    publisher.sent.clear()

    response = client.post(f"/jobs/{job['id']}/retry")

    assert response.status_code == 200
    retried = response.json()
    assert (retried["state"], retried["error"], retried["prediction_id"], retried["finished_at"]) == ("queued", None, None, None)
    assert publisher.sent == [("submit", job["id"], 0.0, None)]


# --- webhooks -----------------------------------------------------------------------------------


def signed(
    payload: dict | bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None, webhook_id: str | None = None
) -> tuple[bytes, dict]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    webhook_id = webhook_id or f"evt-{uuid.uuid4().hex}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    key = secret.removeprefix("whsec_").encode()
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()
    return raw, {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v3,{digest}",
        "content-type": "application/json",
    }


def prediction(prediction_id: str, status: str = "completed") -> dict:
    return {
        "id": prediction_id,
        "model": "bytedance/dreamina-v3.0/edit",
        "outputs": [],
        "status": status,
        "urls": {"get": f"https://api.wavespeed.test/api/v3/predictions/{prediction_id}/result"},
    }


def test_a_signed_webhook_bumps_the_poll_and_publishes_it_without_changing_state(client, deps, publisher, sessions):
    job = processing_job(client, deps)
    seq = jobs.get_job(sessions, job["id"]).poll_seq
    publisher.sent.clear()
    raw, headers = signed(prediction(job["prediction_id"]))

    response = client.post("/webhooks/wavespeed", content=raw, headers=headers)

    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert publisher.sent == [("poll", job["id"], 0.0, seq + 1)]
    row = jobs.get_job(sessions, job["id"])
    assert (row.state, row.poll_seq) == ("processing", seq + 1)
    # The published poll is the live chain and reads the result; the old chain is now stale.
    assert poller.run_poll(deps, job["id"], seq) is None
    assert poller.run_poll(deps, job["id"], seq + 1).step == "upload"


def test_in_batch_poll_mode_a_burst_of_webhooks_makes_the_jobs_due_and_wakes_the_poller_once(
    make_client, settings, deps, publisher, sessions
):
    client = make_client(app_settings=settings.model_copy(update={"poll_mode": "batch"}))
    first, second = processing_job(client, deps), processing_job(client, deps)
    seqs = {job["id"]: jobs.get_job(sessions, job["id"]).poll_seq for job in (first, second)}
    publisher.sent.clear()
    for job in (first, second):
        raw, headers = signed(prediction(job["prediction_id"]))
        assert client.post("/webhooks/wavespeed", content=raw, headers=headers).status_code == 200
    # One poller wake-up for both (de-duplicated per half second), no poll message per job.
    assert [(step, job_id) for step, job_id, *_ in publisher.sent] == [("poll_due", None)]
    for job in (first, second):
        row = jobs.get_job(sessions, job["id"])
        # Taken over (the API's clock is the wall clock) and due now: the poller's pass takes it.
        assert (row.state, row.poll_seq) == ("processing", seqs[job["id"]] + 1)
        assert row.next_poll_at <= jobs.utcnow()


def test_a_webhook_wrapped_in_the_api_envelope_is_understood(client, deps, publisher):
    job = processing_job(client, deps)
    publisher.sent.clear()
    raw, headers = signed({"code": 200, "message": "success", "data": prediction(job["prediction_id"])})

    assert client.post("/webhooks/wavespeed", content=raw, headers=headers).json() == {"ok": True}
    assert [(step, job_id) for step, job_id, *_ in publisher.sent] == [("poll", job["id"])]


def test_a_webhook_for_an_unknown_or_finished_prediction_answers_200_and_does_nothing(client, deps, publisher):
    job = processing_job(client, deps)
    client.post(f"/jobs/{job['id']}/cancel")
    publisher.sent.clear()

    for prediction_id in ("pred-unknown", job["prediction_id"]):
        raw, headers = signed(prediction(prediction_id))
        assert client.post("/webhooks/wavespeed", content=raw, headers=headers).json() == {"ok": True}
    assert publisher.sent == []
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "cancelled"


@pytest.mark.parametrize(
    "tamper",
    [
        "wrong_secret",
        "body_changed",
        "signature_missing",
        "id_missing",
        "old_version",
        "stale_timestamp",
        "future_timestamp",
        "timestamp_not_a_number",
    ],
)
def test_a_webhook_without_a_valid_fresh_signature_answers_401_and_does_nothing(client, deps, publisher, sessions, caplog, tamper):
    caplog.set_level(logging.DEBUG)
    job = processing_job(client, deps)
    seq = jobs.get_job(sessions, job["id"]).poll_seq
    publisher.sent.clear()
    payload = prediction(job["prediction_id"])
    now = int(time.time())
    raw, headers = {
        "wrong_secret": lambda: signed(payload, secret="whsec_not-our-secret"),
        "stale_timestamp": lambda: signed(payload, timestamp=now - 301),
        "future_timestamp": lambda: signed(payload, timestamp=now + 301),
    }.get(tamper, lambda: signed(payload))()
    if tamper == "body_changed":
        raw = raw.replace(b"completed", b"failed")
    elif tamper == "signature_missing":
        del headers["webhook-signature"]
    elif tamper == "id_missing":
        del headers["webhook-id"]
    elif tamper == "old_version":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v3,", "v1,")
    elif tamper == "timestamp_not_a_number":
        headers["webhook-timestamp"] = "yesterday"

    response = client.post("/webhooks/wavespeed", content=raw, headers=headers)

    assert_error(response, 401, "unauthorized")
    assert publisher.sent == []
    assert jobs.get_job(sessions, job["id"]).poll_seq == seq
    secret_core = WEBHOOK_SECRET.removeprefix("whsec_")
    assert secret_core not in response.text
    assert all(secret_core not in record.getMessage() for record in caplog.records)


def test_a_webhook_signed_within_the_tolerance_is_accepted(client, deps, publisher):
    job = processing_job(client, deps)
    raw, headers = signed(prediction(job["prediction_id"]), timestamp=int(time.time()) - 250)

    assert client.post("/webhooks/wavespeed", content=raw, headers=headers).status_code == 200


def test_without_a_configured_secret_the_webhook_endpoint_answers_404(make_client, deps, publisher):
    client = make_client(secret=None)
    job = processing_job(client, deps)
    publisher.sent.clear()
    raw, headers = signed(prediction(job["prediction_id"]))

    assert_error(client.post("/webhooks/wavespeed", content=raw, headers=headers), 404, "not_found")
    assert publisher.sent == []


def test_a_replayed_webhook_inside_the_window_has_no_second_effect(client, deps, publisher, sessions):
    job = processing_job(client, deps)
    publisher.sent.clear()
    raw, headers = signed(prediction(job["prediction_id"]))

    first = client.post("/webhooks/wavespeed", content=raw, headers=headers)
    seq = jobs.get_job(sessions, job["id"]).poll_seq
    replay = client.post("/webhooks/wavespeed", content=raw, headers=headers)

    assert first.json() == {"ok": True}
    assert replay.status_code == 200 and replay.json() == {"ok": True, "duplicate": True}
    assert [step for step, *_ in publisher.sent] == ["poll"]
    assert jobs.get_job(sessions, job["id"]).poll_seq == seq
    # Another delivery (its own id) is taken.
    raw, headers = signed(prediction(job["prediction_id"]))
    assert client.post("/webhooks/wavespeed", content=raw, headers=headers).json() == {"ok": True}
    assert [step for step, *_ in publisher.sent] == ["poll", "poll"]


def test_a_webhook_that_failed_midway_is_taken_again_when_redelivered(make_client, deps, publisher, sessions, monkeypatch):
    authorised = make_client()
    client = TestClient(authorised.app, raise_server_exceptions=False, headers=dict(authorised.headers))
    job = processing_job(client, deps)
    publisher.sent.clear()
    raw, headers = signed(prediction(job["prediction_id"]))
    import worker.api

    real = worker.api.nudge_poll
    monkeypatch.setattr(worker.api, "nudge_poll", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("db gone")))
    assert client.post("/webhooks/wavespeed", content=raw, headers=headers).status_code == 500
    monkeypatch.setattr(worker.api, "nudge_poll", real)

    assert client.post("/webhooks/wavespeed", content=raw, headers=headers).json() == {"ok": True}
    assert [step for step, *_ in publisher.sent] == ["poll"]


def test_without_replay_memory_a_webhook_answers_503(make_client, settings, publisher, monkeypatch):
    class NoRedis:
        def once(self, *_args):
            raise ConnectionError("redis down")

    client = TestClient(
        create_app(
            with_secret(settings, monkeypatch, WEBHOOK_SECRET),
            deps_factory=lambda: type("D", (), {"fleet": NoRedis()})(),
            publisher=publisher,
            url_resolver=resolver,
        )
    )
    raw, headers = signed(prediction("pred-0001"))

    assert_error(client.post("/webhooks/wavespeed", content=raw, headers=headers), 503, "unavailable")
    assert publisher.sent == []


@pytest.mark.parametrize(
    "query",
    [
        {"job_id": "j\u00e9b", "token": "t"},
        {"job_id": "job", "token": "t\u00f6ken"},
        {"job_id": "job", "token": "\u2603" * 40},
        {"job_id": "\u2603" * 100, "token": "abc"},
    ],
)
def test_a_non_ascii_job_id_or_token_is_ignored_not_a_500(client, deps, publisher, query):
    raw, headers = signed(prediction("pred-unknown"))

    response = client.post("/webhooks/wavespeed", params=query, content=raw, headers=headers)

    assert response.status_code == 200, response.text
    assert publisher.sent == []


@pytest.mark.parametrize(
    "header, value",
    [
        ("webhook-id", "\u00e9v\u00e9nement".encode("latin-1")),
        ("webhook-id", "\u2603".encode()),
        ("webhook-timestamp", "\u0661\u0662\u0663".encode()),
        ("webhook-timestamp", b"9" * 400),
        ("webhook-signature", "v3,\u00e9".encode("latin-1")),
        ("webhook-signature", "v3,\u2603".encode()),
    ],
)
def test_non_ascii_or_absurd_webhook_headers_answer_401(client, publisher, header, value):
    raw, headers = signed(prediction("pred-0001"))
    headers[header] = value

    assert_error(client.post("/webhooks/wavespeed", content=raw, headers=headers), 401, "unauthorized")
    assert publisher.sent == []


def test_a_signed_webhook_naming_a_prediction_id_of_an_unexpected_form_answers_422(client):
    raw, headers = signed(prediction("../../api/v3/balance"))

    assert_error(client.post("/webhooks/wavespeed", content=raw, headers=headers), 422, "invalid_input")


def test_a_signed_webhook_on_a_jobs_url_adopts_only_a_prediction_the_provider_confirms(client, deps, fake_provider, clock, sessions):
    import httpx

    from worker.adapters.webhooks import job_webhook_url

    fake_provider.script("submit", fake_provider.After(httpx.ReadTimeout("read timed out")))
    job = create(client)
    submit.run_submit(deps, job["id"])
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "submitting"
    old = fake_provider.create_task(created_at=clock.now() - timedelta(hours=1))
    url = job_webhook_url("http://testserver/webhooks/wavespeed", SecretStr(WEBHOOK_SECRET), job["id"])

    raw, headers = signed(prediction(old.id))
    assert client.post(url, content=raw, headers=headers).status_code == 200
    assert jobs.get_job(sessions, job["id"]).prediction_id is None

    [own] = fake_provider.submissions
    raw, headers = signed(prediction(own.id))
    assert client.post(url, content=raw, headers=headers).status_code == 200
    assert jobs.get_job(sessions, job["id"]).prediction_id == own.id


def test_a_signed_webhook_that_names_no_prediction_answers_422(client):
    raw, headers = signed({"hello": "world"})

    assert_error(client.post("/webhooks/wavespeed", content=raw, headers=headers), 422, "invalid_input")


# --- metrics and health -------------------------------------------------------------------------


def test_metrics_expose_job_counts_per_state_and_the_pipeline_counters(client):
    create(client)
    create(client)

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'edit_worker_jobs{state="queued"} 2.0' in text
    for state in ("submitting", "processing", "uploading", "succeeded", "failed", "cancelled"):
        assert f'edit_worker_jobs{{state="{state}"}} 0.0' in text
    assert "edit_worker_database_up 1.0" in text
    for name in ("edit_worker_provider_requests_total", "edit_worker_transitions_total", "edit_worker_breaker_open"):
        assert f"# TYPE {name} " in text


def test_metrics_count_jobs_at_most_once_per_cache_period(make_client, settings, sessions):
    from sqlalchemy import event

    from worker.adapters.database import get_engine

    client = make_client(app_settings=settings.model_copy(update={"metrics_cache_seconds": 60.0}))
    create(client)
    queries = []
    event.listen(get_engine(settings.database_url), "before_cursor_execute", lambda *a: queries.append(a[2]))

    texts = [client.get("/metrics").text for _ in range(20)]
    create(client)

    # One GROUP BY per collector (jobs by state, paid submissions by tenant) for 20 scrapes.
    assert sum("GROUP BY jobs.state" in q for q in queries) == 1
    assert sum("GROUP BY jobs.tenant" in q for q in queries) == 1
    assert sum("GROUP BY" in q for q in queries) == 2
    assert all('edit_worker_jobs{state="queued"} 1.0' in t for t in texts)
    assert 'edit_worker_jobs{state="queued"} 1.0' in client.get("/metrics").text  # still the cached count


def test_each_app_has_its_own_metrics_registry(make_client):
    first, second = make_client(), make_client()

    assert first.app.state.metrics.registry is not second.app.state.metrics.registry
    assert "edit_worker_breaker_open 0.0" in first.get("/metrics").text


def test_metrics_show_the_breaker_workers_and_the_fleets_flushed_counts(client, deps):
    create(client)  # counted at admission, into the same totals
    deps.breaker.trip(30, "test")
    deps.fleet.heartbeat("host-a:1", {"pid": 1, "host": "host-a"})
    deps.metrics.job_moved("uploading", "succeeded", tenant="default", error_code=None, age_seconds=3.0)
    flush(deps.metrics, deps.metrics_totals)

    text = client.get("/metrics").text

    assert "edit_worker_breaker_open 1.0" in text
    assert "edit_worker_workers_alive 1.0" in text
    assert 'edit_worker_jobs_created_total{tenant="other"} 1.0' in text
    assert 'edit_worker_jobs_finished_total{error_code="",state="succeeded",tenant="other"} 1.0' in text
    assert 'edit_worker_job_duration_seconds_bucket{le="5.0",state="succeeded"} 1.0' in text
    assert "# TYPE edit_worker_outbox_backlog gauge" in text
    assert "edit_worker_metrics_redis_up 1.0" in text


def test_healthz_reports_the_database(client, make_client, settings, tmp_path):
    assert client.get("/healthz").json() == {"ok": True, "database": True}

    broken = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/missing-dir/jobs.db"})
    broken_client = make_client(app_settings=broken)
    response = broken_client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "database": False}
    # Keys live in the database: without it no key can be checked, and the API says so (503, JSON),
    # never letting an unchecked caller through.
    metrics = broken_client.get("/metrics")
    assert_error(metrics, 503, "unavailable")


def test_an_unexpected_failure_answers_500_json_without_internals(settings, publisher, monkeypatch, storage, admin_key):
    def no_redis():
        raise ConnectionError("redis://:hunter2@cache:6379 refused")

    app = create_app(
        with_secret(settings, monkeypatch, None), deps_factory=no_redis, publisher=publisher, url_resolver=resolver, storage=storage
    )
    client = TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {admin_key}"})
    job = create(client)

    response = client.post(f"/jobs/{job['id']}/cancel")

    assert_error(response, 500, "internal")
    assert "hunter2" not in response.text


# --- tenants: keys, quotas, result links -------------------------------------------------------


def test_no_key_or_a_revoked_key_answers_401_and_writes_nothing(make_client, sessions):
    anonymous = make_client()
    anonymous.headers.pop("Authorization")
    assert_error(anonymous.post("/jobs", json=body()), 401, "unauthorized")
    assert_error(anonymous.get("/jobs"), 401, "unauthorized")
    new = tenants.create_key(sessions, "shop")
    tenants.revoke_key(sessions, new.key_id)
    assert_error(make_client(key=new.key.get_secret_value()).get("/jobs"), 401, "unauthorized")
    assert count(sessions, Job) == 0
    assert make_client().get("/healthz").status_code == 200  # health needs no key


def test_a_tenant_over_its_rate_gets_429_with_retry_after(make_client, sessions, settings):
    key = tenants.create_key(sessions, "bursty").key.get_secret_value()
    tenants.set_tenant(sessions, "bursty", rate_per_minute=2)
    client = make_client(key=key)
    assert [client.post("/jobs", json=body(prompt=f"job {i}")).status_code for i in range(2)] == [201, 201]
    refused = client.post("/jobs", json=body(prompt="one too many"))
    assert_error(refused, 429, "quota_exceeded")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert count(sessions, Job) == 2


def test_a_tenant_over_its_daily_budget_gets_429_until_midnight(make_client, sessions):
    key = tenants.create_key(sessions, "thrifty").key.get_secret_value()
    tenants.set_tenant(sessions, "thrifty", daily_budget=1)
    client = make_client(key=key)
    assert client.post("/jobs", json=body()).status_code == 201
    refused = client.post("/jobs", json=body(prompt="over budget"))
    assert_error(refused, 429, "quota_exceeded")
    assert "daily budget" in refused.json()["error"]["message"] and int(refused.headers["Retry-After"]) <= 86400


def test_result_links_open_the_stored_output_and_redirect_after_checking_the_key(client, make_client, deps, sessions, drive):
    job = create(client)
    drive(job["id"])
    done = client.get(f"/jobs/{job['id']}").json()
    assert done["state"] == "succeeded" and len(done["output_urls"]) == len(done["outputs"]) >= 1
    assert done["output_urls"][0].startswith("http") and "Signature" in done["output_urls"][0]
    moved = client.get(f"/jobs/{job['id']}/outputs/0", follow_redirects=False)
    assert moved.status_code == 307 and "Signature" in moved.headers["location"]
    assert_error(client.get(f"/jobs/{job['id']}/outputs/5", follow_redirects=False), 404, "not_found")
    stranger = make_client(key=tenants.create_key(sessions, "stranger").key.get_secret_value())
    assert_error(stranger.get(f"/jobs/{job['id']}/outputs/0", follow_redirects=False), 404, "not_found")


def test_an_idempotency_key_reused_with_another_request_answers_409(client, sessions):
    first = client.post("/jobs", json=body(idempotency_key="order-1"))
    same = client.post("/jobs", json=body(idempotency_key="order-1"))
    other = client.post("/jobs", json=body(idempotency_key="order-1", prompt="something else"))
    assert (first.status_code, same.status_code) == (201, 200) and same.json()["id"] == first.json()["id"]
    assert_error(other, 409, "idempotency_conflict")
    assert count(sessions, Job) == 1


def test_the_openapi_document_names_every_route_with_its_bearer_auth(client):
    spec = client.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/outputs/{index}", "/jobs/retry", "/jobs/cancel", "/keys", "/usage"} <= set(
        spec["paths"]
    )
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert spec["paths"]["/jobs"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert "429" in spec["paths"]["/jobs"]["post"]["responses"]


def test_metrics_show_each_tenants_paid_submissions_and_cost_today(make_client, settings, deps, drive, sessions):
    client = make_client(app_settings=settings.model_copy(update={"cost_per_submission": 0.03}))
    shop = make_client(
        app_settings=settings.model_copy(update={"cost_per_submission": 0.03}),
        key=tenants.create_key(sessions, "shop").key.get_secret_value(),
    )
    for _ in range(2):
        drive(create(shop)["id"])
    job = client.get(f"/jobs/{create(shop)['id']}").json()
    assert job["cost"] == 0 and job["tenant"] == "shop"
    text = client.get("/metrics").text
    assert 'edit_worker_tenant_paid_submissions_today{tenant="shop"} 2.0' in text
    assert 'edit_worker_tenant_cost_today{tenant="shop"} 0.06' in text


def test_a_job_carries_its_callback_url_and_its_deliveries_are_visible_to_its_tenant_only(make_client, sessions):
    shop = make_client(key=tenants.create_key(sessions, "shop").key.get_secret_value())
    other = make_client(key=tenants.create_key(sessions, "other").key.get_secret_value())
    job = create(shop, callback_url="https://images.example.com/hooks/edit-done")
    assert job["callback_url"] == "https://images.example.com/hooks/edit-done"
    assert shop.get(f"/jobs/{job['id']}/deliveries").json() == []  # nothing until it finishes
    shop.post(f"/jobs/{job['id']}/cancel")
    [delivery] = shop.get(f"/jobs/{job['id']}/deliveries").json()
    assert (delivery["event"], delivery["status"]) == ("cancelled", "pending")
    assert_error(other.get(f"/jobs/{job['id']}/deliveries"), 404, "not_found")
    assert_error(other.post(f"/jobs/{job['id']}/redeliver"), 404, "not_found")
    assert shop.post(f"/jobs/{job['id']}/redeliver").json()["webhook_id"] == delivery["webhook_id"]
    assert shop.post("/deliveries/redeliver", json={}).json() == {"redelivered": 0}


def test_a_private_callback_url_is_refused_and_nothing_is_written(client, sessions):
    assert_error(client.post("/jobs", json=body(callback_url="http://10.1.2.3/hook")), 422, "invalid_input")
    assert_error(client.post("/jobs", json=body(callback_url="ftp://images.example.com/hook")), 422, "invalid_input")
    assert count(sessions, Job) == 0


def test_a_tenants_default_callback_url_applies_to_jobs_that_name_none(make_client, sessions):
    key = tenants.create_key(sessions, "shop").key.get_secret_value()
    tenants.set_tenant(sessions, "shop", callback_url="https://images.example.com/shop-hook")
    shop = make_client(key=key)
    assert create(shop)["callback_url"] == "https://images.example.com/shop-hook"
    assert (
        create(shop, callback_url="https://images.example.com/own", prompt="own hook")["callback_url"] == "https://images.example.com/own"
    )


def test_an_admin_sets_a_tenants_quotas_over_http_and_a_tenant_key_may_not(make_client, client, sessions):
    shop = make_client(key=tenants.create_key(sessions, "shop").key.get_secret_value())
    answer = client.put("/tenants/shop", json={"max_in_flight": 3, "daily_budget": 100, "callback_url": "https://images.example.com/h"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["max_in_flight"], answer.json()["daily_budget"]) == (3, 100)
    assert {
        "tenant": "shop",
        "weight": 1,
        "rate_per_minute": None,
        "max_in_flight": 3,
        "daily_budget": 100,
        "callback_url": "https://images.example.com/h",
    } in client.get("/tenants").json()["tenants"]
    assert_error(shop.put("/tenants/shop", json={"max_in_flight": 1000}), 403, "forbidden")
    assert_error(shop.get("/tenants"), 403, "forbidden")
    assert_error(client.put("/tenants/shop", json={"callback_url": "http://10.0.0.1/h"}), 422, "invalid_input")
    assert_error(client.put("/tenants/Bad Name", json={}), 422, "invalid_input")
