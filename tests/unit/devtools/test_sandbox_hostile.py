"""Specification of the sandbox's hostile-provider mode: each kind answers what it says, kinds come
in turn, the admin stats count them, and none of them is an answer the client may take as the
task's result or as a definitive one (the streaming kinds, endless and slow bodies, are exercised
against a real server by tests/integration/test_hostile_provider.py)."""

from __future__ import annotations

import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from worker.adapters.wavespeed import Prediction, classify_result
from worker.devtools.sandbox import HOSTILE_KINDS, SandboxConfig, create_app, parse_args

SUBMIT = "/api/v3/bytedance/dreamina-v3.0/edit"
AUTH = {"Authorization": "Bearer test-key"}
INTERNAL = "http://127.0.0.1:9/latest/meta-data/"
STREAMING = {"endless_body", "slow_drip"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def no_fetch(url: str) -> None:
    return None


def sandbox(**config) -> tuple[TestClient, Clock]:
    clock = Clock()
    # Inputs are never fetched from the network: the edit is made of the placeholder.
    app = create_app(SandboxConfig(latency=1.0, seed=3, internal_url=INTERNAL, **config), clock=clock, sleep=clock.sleep, fetch=no_fetch)
    return TestClient(app, follow_redirects=False), clock


def completed_task(client: TestClient, clock: Clock) -> str:
    prediction_id = client.post(SUBMIT, json={"prompt": "make it blue", "image": "https://example.com/cat.png"}, headers=AUTH).json()[
        "data"
    ]["id"]
    clock.now += 5
    return prediction_id


def go_hostile(client: TestClient, kind: str) -> None:
    assert client.put("/_sandbox/config", json={"hostile_rate": 1.0, "hostile_kinds": kind}).status_code == 200


@pytest.mark.parametrize("kind", [k for k in HOSTILE_KINDS["result"] if k not in STREAMING])
def test_each_hostile_result_answer_is_neither_the_tasks_result_nor_definitive(kind):
    client, clock = sandbox()
    client.post(SUBMIT, json={"prompt": "another task", "image": "https://example.com/cat.png"}, headers=AUTH)  # for wrong_id
    prediction_id = completed_task(client, clock)
    go_hostile(client, kind)
    for _ in range(3):
        response = client.get(f"/api/v3/predictions/{prediction_id}/result", headers=AUTH)
        answer = classify_result(prediction_id, response.status_code, response.headers, response.content)
        assert not isinstance(answer, Prediction), (kind, response.content[:200])
        assert not answer.definitive, (kind, answer)
    assert client.get("/_sandbox/stats").json()["hostile"] == {f"result:{kind}": 3}


@pytest.mark.parametrize("kind", [k for k in HOSTILE_KINDS["download"] if k not in STREAMING])
def test_each_hostile_download_answer_is_not_an_image(kind):
    client, clock = sandbox()
    prediction_id = completed_task(client, clock)
    go_hostile(client, kind)
    response = client.get(f"/outputs/{prediction_id}/0.png")
    if response.is_redirect:
        location = response.headers["location"]
        assert location.endswith("/latest/meta-data/") or location.endswith(f"/outputs/{prediction_id}/0.png")
    else:
        assert not response.content.startswith(b"\x89PNG")


def test_a_hostile_submit_is_an_answered_error_that_creates_no_task():
    client, _ = sandbox(hostile_rate=1.0)
    response = client.post(SUBMIT, json={"prompt": "make it blue", "image": "https://example.com/cat.png"}, headers=AUTH)
    assert response.status_code in (400, 403, 404) and "html" in response.headers["content-type"]
    assert client.get("/_sandbox/stats").json()["submissions"] == 0


def test_hostile_kinds_come_in_turn():
    client, clock = sandbox()
    prediction_id = completed_task(client, clock)
    assert (
        client.put("/_sandbox/config", json={"hostile_rate": 1.0, "hostile_kinds": "html_4xx,garbage_json,truncated_json"}).status_code
        == 200
    )
    for _ in range(6):
        client.get(f"/api/v3/predictions/{prediction_id}/result", headers=AUTH)
    assert client.get("/_sandbox/stats").json()["hostile"] == {"result:garbage_json": 2, "result:html_4xx": 2, "result:truncated_json": 2}


def test_a_private_redirect_points_at_the_internal_url_or_its_localhost_name():
    client, clock = sandbox()
    prediction_id = completed_task(client, clock)
    go_hostile(client, "redirect_private")
    targets = {client.get(f"/outputs/{prediction_id}/0.png").headers["location"] for _ in range(12)}
    assert targets <= {INTERNAL, "http://localhost:9/latest/meta-data/"} and len(targets) == 2


@pytest.mark.parametrize("change", [{"hostile_kinds": "teleport"}, {"hostile_rate": 2}, {"internal_url": "file:///etc/passwd"}])
def test_bad_hostile_config_is_refused(change):
    client, _ = sandbox()
    assert client.put("/_sandbox/config", json=change).status_code == 400


def test_hostile_flags_and_env():
    _, _, config = parse_args(
        ["--hostile-rate", "0.3", "--hostile-kinds", "html_4xx,slow_drip"], environ={"SANDBOX_INTERNAL_URL": INTERNAL}
    )
    assert (config.hostile_rate, config.hostile_kinds, config.internal_url) == (0.3, "html_4xx,slow_drip", INTERNAL)


def test_an_honest_sandbox_stays_honest():
    client, clock = sandbox()
    prediction_id = completed_task(client, clock)
    response = client.get(f"/api/v3/predictions/{prediction_id}/result", headers=AUTH)
    assert isinstance(classify_result(prediction_id, response.status_code, response.headers, response.content), Prediction)
    assert client.get(f"/outputs/{prediction_id}/0.png").content.startswith(b"\x89PNG")
    assert client.get("/_sandbox/stats").json()["hostile"] == {}


def test_duplicate_id_is_opt_in_and_bills_a_task_answered_with_another_tasks_id():
    client, _ = sandbox(hostile_rate=1.0)
    first = client.post(SUBMIT, json={"prompt": "first", "image": "https://example.com/cat.png"}, headers=AUTH)
    assert first.status_code in (400, 403, 404)  # the default mix: answered errors only
    assert client.put("/_sandbox/config", json={"hostile_rate": 0.0}).status_code == 200
    honest = client.post(SUBMIT, json={"prompt": "first", "image": "https://example.com/cat.png"}, headers=AUTH).json()["data"]["id"]
    go_hostile(client, "duplicate_id")
    answer = client.post(SUBMIT, json={"prompt": "second", "image": "https://example.com/cat.png"}, headers=AUTH)
    assert answer.status_code == 200 and answer.json()["data"]["id"] == honest
    tasks = client.get("/_sandbox/stats").json()["tasks"]
    assert sorted(t["prompt"] for t in tasks) == ["first", "second"]  # the second was created (billed)
