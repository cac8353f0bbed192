"""Tenant isolation on PostgreSQL: every route of `edit-worker api` × (own tenant's key, another
tenant's key, no key, a revoked key, an admin key). Another tenant's job answers 404 exactly like a
job that does not exist; nothing of one tenant is listed, changed or counted for another."""

from __future__ import annotations

import base64
import io
import warnings

import pytest
from PIL import Image

from worker.core import jobs, tenants
from worker.core.states import State
from worker.core.steps import RecordingPublisher
from worker.engine import deps as deps_module

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from worker.api import create_app

pytestmark = pytest.mark.integration

CALLERS = ("own", "other", "none", "revoked", "admin")


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def world(cluster):
    """Tenant `alpha` with a queued, a failed and a succeeded job; tenant `beta` with one job; keys."""
    settings = cluster.settings
    sessions = cluster.sessions()
    keys = {
        "own": tenants.create_key(sessions, "alpha").key.get_secret_value(),
        "other": tenants.create_key(sessions, "beta").key.get_secret_value(),
        "admin": tenants.create_key(sessions, "ops", admin=True).key.get_secret_value(),
    }
    revoked = tenants.create_key(sessions, "alpha")
    tenants.revoke_key(sessions, revoked.key_id)
    keys["revoked"] = revoked.key.get_secret_value()
    alpha_key_id = tenants.list_keys(sessions, tenant="alpha")[0].id

    publisher = RecordingPublisher()
    deps_module.reset_deps()
    app = create_app(settings, publisher=publisher, deps_factory=lambda: deps_module.build_deps(settings, publisher))
    client = TestClient(app)

    def create(tenant_key: str, **extra) -> dict:
        answer = client.post(
            "/jobs", json={"image": _png(), "prompt": "isolation", **extra}, headers={"Authorization": f"Bearer {tenant_key}"}
        )
        assert answer.status_code == 201, answer.text
        return answer.json()

    queued = create(keys["own"])
    failed = create(keys["own"], prompt="will fail")
    done = create(keys["own"], prompt="will succeed")
    theirs = create(keys["other"])
    with sessions() as session:
        jobs.transition(session, failed["id"], State.QUEUED, State.FAILED, "test: failed", error_code="test_failure", error_message="x")
        for src, dst in ((State.QUEUED, State.SUBMITTING), (State.SUBMITTING, State.PROCESSING), (State.PROCESSING, State.UPLOADING)):
            jobs.transition(session, done["id"], src, dst, "test")
        jobs.transition(session, done["id"], State.UPLOADING, State.SUCCEEDED, "test", outputs=[f"s3://{settings.s3_bucket}/edits/x/0.png"])
        session.commit()
    yield {
        "client": client,
        "keys": keys,
        "queued": queued,
        "failed": failed,
        "done": done,
        "theirs": theirs,
        "sessions": sessions,
        "alpha_key_id": alpha_key_id,
    }
    deps_module.reset_deps()


def _call(world, caller: str, method: str, path: str, json=None):
    headers = {} if caller == "none" else {"Authorization": f"Bearer {world['keys'][caller]}"}
    return world["client"].request(method, path, json=json, headers=headers, follow_redirects=False)


# (name, method, path template, body, expected status per caller)
ROUTES = [
    ("read", "GET", "/jobs/{queued}", None, {"own": 200, "other": 404, "admin": 200}),
    ("events", "GET", "/jobs/{queued}/events", None, {"own": 200, "other": 404, "admin": 200}),
    ("result link", "GET", "/jobs/{done}/outputs/0", None, {"own": 307, "other": 404, "admin": 307}),
    ("retry", "POST", "/jobs/{failed}/retry", None, {"own": 200, "other": 404, "admin": 200}),
    ("cancel", "POST", "/jobs/{queued}/cancel", None, {"own": 200, "other": 404, "admin": 200}),
    ("list", "GET", "/jobs", None, {"own": 200, "other": 200, "admin": 200}),
    ("create", "POST", "/jobs", {"prompt": "new"}, {"own": 201, "other": 201, "admin": 201}),
    ("bulk retry", "POST", "/jobs/retry", {}, {"own": 200, "other": 200, "admin": 200}),
    ("bulk cancel", "POST", "/jobs/cancel", {}, {"own": 200, "other": 200, "admin": 200}),
    ("usage", "GET", "/usage", None, {"own": 200, "other": 200, "admin": 200}),
    ("keys", "GET", "/keys", None, {"own": 200, "other": 200, "admin": 200}),
    ("new key", "POST", "/keys", {"tenant": "gamma"}, {"own": 403, "other": 403, "admin": 201}),
    ("metrics", "GET", "/metrics", None, {"own": 403, "other": 403, "admin": 200}),
    ("revoke key", "DELETE", "/keys/{alpha_key_id}", None, {"own": 200, "other": 404, "admin": 200}),
]


@pytest.mark.parametrize("caller", CALLERS)
def test_every_route_for_one_kind_of_caller(world, caller):
    """The routes run in the order of ROUTES (reads before the changes, revoking the caller's own
    key last), on one fresh world per caller."""
    for route in ROUTES:
        _check(world, route, caller)


def _check(world, route, caller):
    name, method, template, body, expected = route
    path = template.format(
        queued=world["queued"]["id"], failed=world["failed"]["id"], done=world["done"]["id"], alpha_key_id=world["alpha_key_id"]
    )
    if body is not None and name == "create":
        body = {"image": _png(), **body}
    answer = _call(world, caller, method, path, json=body)
    want = 401 if caller in ("none", "revoked") else expected[caller]
    assert answer.status_code == want, (name, caller, answer.status_code, answer.text[:300])
    if want >= 400:
        assert set(answer.json()["error"]) == {"code", "message"}, (name, caller)
        return
    # What a success shows or changes stays inside the caller's tenant.
    alpha_ids = {world["queued"]["id"], world["failed"]["id"], world["done"]["id"]}
    if name == "list":
        listed = {j["id"] for j in answer.json()["jobs"]}
        tenants_listed = {j["tenant"] for j in answer.json()["jobs"]}
        if caller == "own":
            assert listed == alpha_ids and tenants_listed == {"alpha"}
        elif caller == "other":
            assert listed == {world["theirs"]["id"]} and tenants_listed == {"beta"}
        else:
            assert alpha_ids | {world["theirs"]["id"]} <= listed
    if name == "create":
        assert answer.json()["tenant"] == {"own": "alpha", "other": "beta", "admin": "ops"}[caller]
    if name in ("bulk retry", "bulk cancel"):
        touched = set(answer.json()["jobs"])
        if caller == "other":
            assert not touched & alpha_ids
        if caller == "own":
            assert world["theirs"]["id"] not in touched
    if name == "usage":
        names = {row["tenant"] for row in answer.json()["tenants"]}
        assert names == ({"alpha"} if caller == "own" else {"beta"} if caller == "other" else names | {"alpha", "beta"})
    if name == "keys":
        key_tenants = {k["tenant"] for k in answer.json()["keys"]}
        assert key_tenants == ({"alpha"} if caller == "own" else {"beta"} if caller == "other" else key_tenants | {"alpha", "beta", "ops"})
        assert all("key" not in k and "key_hash" not in k for k in answer.json()["keys"])


def test_an_idempotency_key_is_per_tenant_and_refuses_another_request(world):
    own = _call(world, "own", "POST", "/jobs", json={"image": _png(), "prompt": "order one", "idempotency_key": "order-1"})
    again = _call(world, "own", "POST", "/jobs", json={"image": _png(), "prompt": "order one", "idempotency_key": "order-1"})
    changed = _call(world, "own", "POST", "/jobs", json={"image": _png(), "prompt": "a different edit", "idempotency_key": "order-1"})
    theirs = _call(world, "other", "POST", "/jobs", json={"image": _png(), "prompt": "their order", "idempotency_key": "order-1"})
    assert (own.status_code, again.status_code, changed.status_code, theirs.status_code) == (201, 200, 409, 201)
    assert again.json()["id"] == own.json()["id"] != theirs.json()["id"]
    assert changed.json()["error"]["code"] == "idempotency_conflict"
    assert theirs.json()["prompt"] == "their order"  # never another tenant's job or prompt
