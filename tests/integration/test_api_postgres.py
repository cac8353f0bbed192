"""The HTTP API on real PostgreSQL and Redis: what SQLite lets through and PostgreSQL refuses
(NUL in text) is a 422, not a 503 "database unavailable"; keyset pages walk every job once; a
replayed webhook is refused through Redis (SET NX with a TTL)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import time
import uuid
import warnings
from types import SimpleNamespace

import pytest
from PIL import Image
from pydantic import SecretStr

from worker.adapters.fleet import RedisFleet
from worker.adapters.redis_client import connect
from worker.api import create_app
from worker.core import tenants
from worker.core.steps import RecordingPublisher

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration

SECRET = "whsec_integration-api-not-a-secret"


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def api(cluster):
    settings = cluster.settings.model_copy(update={"webhook_secret": SecretStr(SECRET)})
    fleet = RedisFleet(connect(settings.limiter_redis_url))
    publisher = RecordingPublisher()
    app = create_app(settings, deps_factory=lambda: SimpleNamespace(fleet=fleet), publisher=publisher)
    key = tenants.create_key(cluster.sessions(), "default", admin=True).key.get_secret_value()
    return TestClient(app, headers={"Authorization": f"Bearer {key}"}), publisher


@pytest.mark.parametrize("field", ["prompt", "idempotency_key"])
def test_a_nul_byte_answers_422_on_postgresql(api, field):
    client, publisher = api
    payload = {"image": png_b64(), "prompt": "make it red", field: "with a \x00 inside"}

    response = client.post("/jobs", content=json.dumps(payload), headers={"content-type": "application/json"})

    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_input"
    assert client.get("/jobs").json() == {"jobs": [], "next_cursor": None}
    assert publisher.sent == []


def test_keyset_pages_walk_every_job_once_on_postgresql(api):
    client, _ = api
    made = [client.post("/jobs", json={"image": png_b64(), "prompt": f"edit {i}"}).json()["id"] for i in range(7)]

    seen, cursor = [], None
    while True:
        page = client.get("/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]
    assert [j["id"] for j in client.get("/jobs", params={"state": "queued", "limit": 2, "offset": 5}).json()["jobs"]] == made[1::-1]


def test_a_replayed_webhook_is_refused_through_redis(api):
    client, _ = api
    raw = json.dumps({"id": "pred-not-ours", "status": "completed"}).encode()
    webhook_id, timestamp = f"evt-{uuid.uuid4().hex}", str(int(time.time()))
    digest = hmac.new(SECRET.removeprefix("whsec_").encode(), f"{webhook_id}.{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()
    headers = {"webhook-id": webhook_id, "webhook-timestamp": timestamp, "webhook-signature": f"v3,{digest}"}

    assert client.post("/webhooks/wavespeed", content=raw, headers=headers).json() == {"ok": True}
    assert client.post("/webhooks/wavespeed", content=raw, headers=headers).json() == {"ok": True, "duplicate": True}
