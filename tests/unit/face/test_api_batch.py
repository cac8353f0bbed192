"""Specification of POST /jobs/batch: 1..1000 job requests, all or nothing (one invalid request:
422 naming each bad one by index, nothing written), the same auth, idempotency and quotas as
POST /jobs, the jobs answered in request order, the body size capped before it is read."""

from __future__ import annotations

import base64
import io
import warnings

import pytest
from PIL import Image
from sqlalchemy import func, select

with warnings.catch_warnings():
    # Starlette's TestClient warns about httpx at import time; irrelevant to these tests.
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from models import IdempotencyKey, Job, JobEvent, Outbox
from worker.api import MAX_BATCH_JOBS, create_app
from worker.core import tenants
from worker.core.steps import Step

PUBLIC_URL = "https://images.example.com/cat.png"


def resolver(host: str) -> list[str]:
    return {"images.example.com": ["93.184.216.34"], "intranet.example.com": ["10.1.2.3"]}[host]


def b64_image(color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def job(**overrides) -> dict:
    payload = {"image": b64_image(), "prompt": "make the sky purple"}
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


@pytest.fixture
def make_client(settings, deps, publisher, sessions):
    admin_key = tenants.create_key(sessions, "default", admin=True).key.get_secret_value()

    def make(*, key: str | None = None, app_settings=None, storage=None) -> TestClient:
        app = create_app(
            app_settings or settings, deps_factory=lambda: deps, publisher=publisher, url_resolver=resolver, storage=storage or deps.storage
        )
        return TestClient(app, headers={"Authorization": f"Bearer {key or admin_key}"})

    return make


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def count(sessions, model) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def nothing_written(sessions) -> bool:
    return all(count(sessions, model) == 0 for model in (Job, JobEvent, Outbox, IdempotencyKey))


def refused_items(response) -> list[tuple[int, str]]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and error["message"]
    return [(item["index"], item["message"]) for item in error["items"]]


def test_a_batch_answers_201_with_its_jobs_in_request_order_and_one_wakeup_per_job(client, sessions, publisher):
    requests = [job(prompt=f"edit {i}", seed=i) for i in range(5)] + [job(image=PUBLIC_URL, prompt="edit 5")]

    response = client.post("/jobs/batch", json={"jobs": requests})

    assert response.status_code == 201, response.text
    answered = response.json()["jobs"]
    assert [j["prompt"] for j in answered] == [f"edit {i}" for i in range(6)]
    assert [j["seed"] for j in answered[:5]] == list(range(5))
    assert {j["state"] for j in answered} == {"queued"}
    assert count(sessions, Job) == count(sessions, JobEvent) == count(sessions, Outbox) == 6
    assert sorted(job_id for step, job_id, *_ in publisher.sent if step == Step.SUBMIT) == sorted(j["id"] for j in answered)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Outbox).where(Outbox.sent_at.is_(None))) == 0


def test_one_invalid_request_refuses_the_whole_batch_naming_every_bad_index(client, sessions, publisher):
    requests = [job(), job(prompt="x" * 121), job(), job(size="9*9"), job(image="not base64 at all!")]

    items = refused_items(client.post("/jobs/batch", json={"jobs": requests}))

    assert [index for index, _ in items] == [1, 3, 4]
    assert "prompt" in items[0][1] and "size" in items[1][1] and "image" in items[2][1]
    assert nothing_written(sessions) and publisher.sent == []


def test_a_request_of_the_wrong_shape_is_named_by_its_index_too(client, sessions):
    requests = [job(), job(sead=3), {"prompt": "no image"}]

    items = refused_items(client.post("/jobs/batch", json={"jobs": requests}))

    assert [index for index, _ in items] == [1, 2]
    assert "sead" in items[0][1] and "image" in items[1][1]
    assert nothing_written(sessions)


@pytest.mark.parametrize("payload", [{"jobs": []}, {}, {"jobs": [job()] * (MAX_BATCH_JOBS + 1)}, [job()]])
def test_an_empty_missing_or_oversized_job_list_answers_422(client, sessions, payload):
    response = client.post("/jobs/batch", json=payload)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_input"
    assert nothing_written(sessions)


def test_a_body_over_the_batch_limit_is_refused_with_413_before_it_is_read(make_client, settings, sessions):
    client = make_client(app_settings=settings.model_copy(update={"batch_max_bytes": 4096}))
    response = client.post("/jobs/batch", json={"jobs": [job() for _ in range(200)]})
    assert response.status_code == 413 and response.json()["error"]["code"] == "invalid_input"
    assert nothing_written(sessions)


def test_the_same_image_in_many_requests_is_stored_once(client, sessions, list_keys):
    response = client.post("/jobs/batch", json={"jobs": [job(prompt=f"edit {i}") for i in range(10)] + [job(image=b64_image((1, 2, 3)))]})

    assert response.status_code == 201
    inputs = [k for k in list_keys() if "/inputs/" in k]
    assert len(inputs) == 2 and all("/inputs/sha256-" in k for k in inputs)
    with sessions() as s:
        assert len(set(s.scalars(select(Job.image_uri)))) == 2


def test_idempotency_keys_within_a_batch_and_against_earlier_jobs(client, sessions, publisher):
    first = client.post("/jobs", json=job(idempotency_key="order-1")).json()

    response = client.post(
        "/jobs/batch",
        json={"jobs": [job(idempotency_key="order-1"), job(idempotency_key="order-2"), job(idempotency_key="order-2"), job()]},
    )

    assert response.status_code == 201
    ids = [j["id"] for j in response.json()["jobs"]]
    assert ids[0] == first["id"]  # the earlier job, not a new one
    assert ids[1] == ids[2] and len(set(ids)) == 3  # one key twice in a batch: one job
    assert count(sessions, Job) == 3
    replay = client.post("/jobs/batch", json={"jobs": [job(idempotency_key="order-1"), job(idempotency_key="order-2")]})
    assert replay.status_code == 200 and [j["id"] for j in replay.json()["jobs"]] == ids[:2]
    assert count(sessions, Job) == 3


def test_a_key_reused_with_another_request_answers_409_and_writes_nothing_of_the_batch(client, sessions):
    client.post("/jobs", json=job(idempotency_key="order-1"))

    response = client.post("/jobs/batch", json={"jobs": [job(prompt="fresh"), job(idempotency_key="order-1", prompt="something else")]})

    assert response.status_code == 409 and response.json()["error"]["code"] == "idempotency_conflict"
    assert count(sessions, Job) == 1  # not even the fresh one


def test_a_batch_over_the_tenants_rate_answers_429_and_writes_nothing(make_client, sessions):
    key = tenants.create_key(sessions, "bursty").key.get_secret_value()
    tenants.set_tenant(sessions, "bursty", rate_per_minute=3)
    client = make_client(key=key)

    refused = client.post("/jobs/batch", json={"jobs": [job(prompt=f"edit {i}") for i in range(4)]})

    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert count(sessions, Job) == 0
    assert client.post("/jobs/batch", json={"jobs": [job(prompt=f"edit {i}") for i in range(3)]}).status_code == 201


def test_a_tenant_key_creates_jobs_for_its_own_tenant_only(make_client, sessions):
    key = tenants.create_key(sessions, "shop").key.get_secret_value()
    client = make_client(key=key)

    assert client.post("/jobs/batch", json={"jobs": [job(), job(tenant="other")]}).status_code == 403
    assert count(sessions, Job) == 0
    response = client.post("/jobs/batch", json={"jobs": [job(), job(tenant="shop")]})
    assert response.status_code == 201 and {j["tenant"] for j in response.json()["jobs"]} == {"shop"}
    anonymous = make_client()
    anonymous.headers.pop("Authorization")
    assert anonymous.post("/jobs/batch", json={"jobs": [job()]}).status_code == 401


def test_s3_down_refuses_the_whole_batch_with_503(make_client, down_storage, sessions, publisher):
    client = make_client(storage=down_storage)
    response = client.post("/jobs/batch", json={"jobs": [job(image=PUBLIC_URL), job()]})
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
    assert nothing_written(sessions) and publisher.sent == []


def test_the_openapi_document_describes_the_batch_route(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/jobs/batch"]["post"]
    assert post["security"] == [{"HTTPBearer": []}]
    assert {"201", "401", "403", "409", "413", "422", "429", "503"} <= set(post["responses"])
    schema = spec["components"]["schemas"]["CreateJobs"]["properties"]["jobs"]
    assert (schema["minItems"], schema["maxItems"]) == (1, MAX_BATCH_JOBS)
