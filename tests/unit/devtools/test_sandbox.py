"""Specification of the sandbox provider: the WaveSpeed-compatible API, fault injection and admin API.
Time is driven by an injected clock, so no test sleeps except the real-server smoke test."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from PIL import Image

with warnings.catch_warnings():
    # Starlette's TestClient warns about httpx at import time; irrelevant to these tests.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from worker.devtools.sandbox import (
    INJECTED_TASK_FAILURE,
    MODEL_ID,
    SandboxConfig,
    create_app,
    parse_args,
    render_edit,
    render_png,
)

SUBMIT = "/api/v3/bytedance/dreamina-v3.0/edit"
AUTH = {"Authorization": "Bearer test-key"}
IMAGE_URL = "https://example.com/cat.png"
REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class FakeInputs:
    """The sandbox's input fetcher: serves registered images by URL, records what it was asked for."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {IMAGE_URL: png_bytes((200, 40, 40), (96, 64))}
        self.fetched: list[str] = []

    def __call__(self, url: str) -> bytes | None:
        self.fetched.append(url)
        return self.images.get(url)


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (0, 0, size[0] // 2, size[1] // 2))  # not uniform, so a mirror shows
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_client(clock: FakeClock, inputs: FakeInputs | None = None, **config) -> TestClient:
    config.setdefault("latency", 10.0)
    fetch = inputs if inputs is not None else FakeInputs()
    return TestClient(create_app(SandboxConfig(**config), clock=clock, sleep=clock.sleep, fetch=fetch))


@pytest.fixture
def client(clock: FakeClock) -> TestClient:
    return make_client(clock)


def submit(client: TestClient, **body) -> httpx.Response:
    payload = {"prompt": "make it blue", "image": IMAGE_URL}
    payload.update(body)
    return client.post(SUBMIT, json=payload, headers=AUTH)


def result(client: TestClient, prediction_id: str) -> httpx.Response:
    return client.get(f"/api/v3/predictions/{prediction_id}/result", headers=AUTH)


def stats(client: TestClient) -> dict:
    return client.get("/_sandbox/stats").json()


def tiny_png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- submit validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x" * 121}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"size": "511*1024"}, "size"),
        ({"size": "1024*2049"}, "size"),
        ({"size": "1024x1024"}, "size"),
        ({"seed": -2}, "seed"),
        ({"seed": 2147483648}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"image": None}, "image"),
        ({"image": "not base64 at all!"}, "image"),
        ({"image": "data:text/plain;base64,aGVsbG8="}, "image"),
        ({"enable_sync_mode": "yes"}, "enable_sync_mode"),
    ],
)
def test_invalid_submit_is_rejected_with_400_naming_the_field_and_creates_no_task(client, body, field):
    payload = {"prompt": "make it blue", "image": IMAGE_URL, **body}
    payload = {k: v for k, v in payload.items() if v is not None}
    response = client.post(SUBMIT, json=payload, headers=AUTH)

    assert response.status_code == 400
    envelope = response.json()
    assert envelope["code"] == 400
    assert field in envelope["message"]
    assert envelope["data"] is None
    counts = stats(client)
    assert counts["submissions"] == 0
    assert counts["submit_requests"] == 1
    assert counts["tasks"] == []


def test_submit_body_that_is_not_json_is_a_400(client):
    response = client.post(SUBMIT, content=b"{nope", headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["code"] == 400


@pytest.mark.parametrize(
    "image",
    [IMAGE_URL, "http://example.com/a.jpg", tiny_png_base64(), "data:image/png;base64," + tiny_png_base64()],
)
def test_image_may_be_a_url_a_data_uri_or_bare_base64(client, image):
    assert submit(client, image=image).status_code == 200


def test_prompt_limit_is_120_characters_counting_chinese_characters_as_one(client):
    assert submit(client, prompt="x" * 120).status_code == 200
    assert submit(client, prompt="把天空变成蓝色" * 17).status_code == 200  # 119 characters
    assert submit(client, prompt="把" * 121).status_code == 400


def test_size_and_seed_accept_their_boundaries(client):
    assert submit(client, size="512*2048", seed=-1).status_code == 200
    assert submit(client, size="2048*512", seed=2147483647).status_code == 200


# --- auth --------------------------------------------------------------------------------------------


def test_missing_authorization_header_is_401(client):
    response = client.post(SUBMIT, json={"prompt": "p", "image": IMAGE_URL})
    assert response.status_code == 401
    assert response.json()["code"] == 401
    assert client.get("/api/v3/predictions/abc/result").status_code == 401
    assert stats(client)["submissions"] == 0


def test_any_bearer_token_is_accepted_when_no_api_key_is_configured(client):
    response = client.post(SUBMIT, json={"prompt": "p", "image": IMAGE_URL}, headers={"Authorization": "Bearer z"})
    assert response.status_code == 200


def test_wrong_key_is_401_and_neither_key_is_echoed(clock):
    client = make_client(clock, api_key="s3cret-key")
    body = {"prompt": "p", "image": IMAGE_URL}

    wrong = client.post(SUBMIT, json=body, headers={"Authorization": "Bearer wrong-key"})
    assert wrong.status_code == 401
    assert "wrong-key" not in wrong.text and "s3cret-key" not in wrong.text
    assert client.post(SUBMIT, json=body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    assert "s3cret-key" not in client.get("/_sandbox/config").text
    assert stats(client)["submissions"] == 1


def test_auth_failure_mode_answers_401_on_provider_endpoints_but_not_admin(clock):
    client = make_client(clock, auth_failure=True)
    assert submit(client).status_code == 401
    assert result(client, "abc").status_code == 401
    assert client.post("/api/v3/predictions", json={}, headers=AUTH).status_code == 401
    assert client.get("/_sandbox/health").json() == {"ok": True}


# --- lifecycle -----------------------------------------------------------------------------------------


def test_task_goes_created_processing_completed_with_exactly_one_output_url(client, clock):
    submitted = submit(client, size="1024*768", seed=42)
    assert submitted.status_code == 200
    envelope = submitted.json()
    assert envelope["code"] == 200 and envelope["message"] == "success"
    prediction = envelope["data"]
    prediction_id = prediction["id"]
    assert len(prediction_id) == 32 and int(prediction_id, 16) >= 0
    assert prediction["model"] == MODEL_ID
    assert prediction["status"] == "created"
    assert prediction["outputs"] == []
    assert prediction["error"] == ""
    assert prediction["urls"]["get"] == f"http://testserver/api/v3/predictions/{prediction_id}/result"
    assert prediction["created_at"].endswith("Z")
    datetime.fromisoformat(prediction["created_at"])

    assert result(client, prediction_id).json()["data"]["status"] == "created"
    clock.advance(5)
    processing = result(client, prediction_id).json()["data"]
    assert processing["status"] == "processing" and processing["outputs"] == []
    clock.advance(5)
    completed = result(client, prediction_id).json()["data"]
    assert completed["status"] == "completed"
    assert completed["outputs"] == [f"http://testserver/outputs/{prediction_id}/0.png"]
    assert completed["has_nsfw_contents"] == [False]
    assert completed["timings"]["inference"] == 10_000


def test_unknown_prediction_is_a_404_envelope(client):
    response = result(client, "0" * 32)
    assert response.status_code == 404
    assert response.json()["code"] == 404 and response.json()["data"] is None


def test_latency_change_does_not_move_tasks_already_submitted(client, clock):
    prediction_id = submit(client).json()["data"]["id"]
    client.put("/_sandbox/config", json={"latency": 1000})
    clock.advance(10)
    assert result(client, prediction_id).json()["data"]["status"] == "completed"


# --- outputs -------------------------------------------------------------------------------------------


def test_download_is_a_png_of_the_requested_size_and_identical_on_every_get(client, clock):
    prediction_id = submit(client, size="640*1024", seed=7).json()["data"]["id"]
    output_path = f"/outputs/{prediction_id}/0.png"
    assert client.get(output_path).status_code == 404  # not completed yet
    clock.advance(10)
    url = result(client, prediction_id).json()["data"]["outputs"][0]

    first = client.get(url)
    second = client.get(url)
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/png"
    assert first.content == second.content
    image = Image.open(io.BytesIO(first.content))
    assert image.format == "PNG" and image.size == (640, 1024)

    client.app.state.sandbox.pngs.clear()  # an evicted PNG is regenerated byte for byte
    assert client.get(url).content == first.content
    assert client.get(f"/outputs/{prediction_id}/1.png").status_code == 404
    assert stats(client)["downloads"] == 5


def test_different_tasks_get_different_images(client, clock):
    first_id = submit(client, prompt="a").json()["data"]["id"]
    second_id = submit(client, prompt="b").json()["data"]["id"]
    clock.advance(10)
    first = client.get(f"/outputs/{first_id}/0.png").content
    second = client.get(f"/outputs/{second_id}/0.png").content
    assert first != second


def test_base64_output_is_bare_base64_of_the_same_png_the_url_variant_serves(client, clock):
    submitted = submit(client, size="512*640", seed=3, enable_base64_output=True).json()["data"]
    clock.advance(10)
    outputs = result(client, submitted["id"]).json()["data"]["outputs"]

    assert len(outputs) == 1
    assert not outputs[0].startswith("data:")
    png = base64.b64decode(outputs[0], validate=True)
    assert png == render_edit(FakeInputs().images[IMAGE_URL], "make it blue", 3, 512, 640)
    assert png == client.get(f"/outputs/{submitted['id']}/0.png").content
    assert Image.open(io.BytesIO(png)).size == (512, 640)


def test_sync_mode_waits_for_completion_and_answers_the_output(client, clock):
    response = submit(client, enable_sync_mode=True)
    prediction = response.json()["data"]
    assert response.status_code == 200
    assert prediction["status"] == "completed"
    assert len(prediction["outputs"]) == 1
    assert clock.sleeps == [10.0]


def test_download_fail_rate_answers_503(clock):
    client = make_client(clock, download_fail_rate=1.0)
    prediction_id = submit(client).json()["data"]["id"]
    clock.advance(10)
    assert client.get(f"/outputs/{prediction_id}/0.png").status_code == 503


# --- injected faults ---------------------------------------------------------------------------------------


def test_fail_rate_one_makes_tasks_end_failed_with_error_text_and_no_output(clock):
    client = make_client(clock, fail_rate=1.0)
    prediction_id = submit(client).json()["data"]["id"]
    clock.advance(5)
    assert result(client, prediction_id).json()["data"]["status"] == "processing"
    clock.advance(5)
    response = result(client, prediction_id)

    assert response.status_code == 200  # a failed task is still a successful poll
    prediction = response.json()["data"]
    assert prediction["status"] == "failed"
    assert prediction["error"] == INJECTED_TASK_FAILURE
    assert prediction["outputs"] == []
    assert client.get(f"/outputs/{prediction_id}/0.png").status_code == 404


def test_submit_error_429_carries_retry_after_and_creates_no_task(clock):
    client = make_client(clock, submit_error_rate=1.0, submit_error_status=429)
    response = submit(client)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["code"] == 429
    assert stats(client)["submissions"] == 0
    assert stats(client)["submit_requests"] == 1


def test_submit_error_502_answers_an_html_body_and_creates_no_task(clock):
    client = make_client(clock, submit_error_rate=1.0, submit_error_status=502)
    response = submit(client)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "502 Bad Gateway" in response.text
    assert stats(client)["submissions"] == 0


def test_submit_error_500_answers_a_json_envelope(clock):
    client = make_client(clock, submit_error_rate=1.0, submit_error_status=500)
    response = submit(client)
    assert response.status_code == 500
    assert response.json()["code"] == 500
    assert stats(client)["submissions"] == 0


def test_result_error_rate_answers_500_envelope(clock):
    client = make_client(clock)
    prediction_id = submit(client).json()["data"]["id"]
    client.put("/_sandbox/config", json={"result_error_rate": 1.0})
    response = result(client, prediction_id)
    assert response.status_code == 500
    assert response.json()["code"] == 500


def test_slow_submit_creates_the_task_before_answering_late(clock):
    client = make_client(clock, slow_submit_rate=1.0, slow_submit_seconds=30.0)
    response = submit(client)
    assert response.status_code == 200
    assert response.json()["data"]["status"] == "created"
    assert clock.sleeps == [30.0]
    assert stats(client)["submissions"] == 1


def test_outage_answers_503_html_everywhere_except_admin(clock):
    client = make_client(clock)
    prediction_id = submit(client).json()["data"]["id"]
    clock.advance(10)
    client.put("/_sandbox/config", json={"outage": True})

    for response in (
        submit(client),
        result(client, prediction_id),
        client.get(f"/outputs/{prediction_id}/0.png"),
        client.post("/api/v3/predictions", json={}, headers=AUTH),
        client.delete(f"/api/v3/predictions/{prediction_id}", headers=AUTH),
    ):
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("text/html")
        assert "<html>" in response.text
    assert client.get("/_sandbox/health").status_code == 200
    assert stats(client)["submissions"] == 1


def test_same_seed_gives_the_same_fault_sequence():
    def fates(seed: int) -> list[str]:
        clock = FakeClock()
        client = make_client(clock, fail_rate=0.5, seed=seed)
        ids = [submit(client).json()["data"]["id"] for _ in range(20)]
        clock.advance(10)
        return [result(client, prediction_id).json()["data"]["status"] for prediction_id in ids]

    first = fates(1234)
    assert first == fates(1234)
    assert {"completed", "failed"} == set(first)


# --- list ---------------------------------------------------------------------------------------------------


def test_list_filters_by_creation_window_newest_first_without_inputs(client, clock):
    early = submit(client, prompt="early").json()["data"]
    clock.advance(100)
    middle = submit(client, prompt="middle").json()["data"]
    clock.advance(100)
    late = submit(client, prompt="late").json()["data"]

    def listing(**query) -> dict:
        response = client.post("/api/v3/predictions", json=query, headers=AUTH)
        assert response.status_code == 200
        return response.json()["data"]

    everything = listing()
    assert everything["page"] == 1 and everything["total"] == 3
    assert [item["id"] for item in everything["items"]] == [late["id"], middle["id"], early["id"]]
    assert all("prompt" not in item and "image" not in item for item in everything["items"])

    middle_at = datetime.fromisoformat(middle["created_at"])
    after = (middle_at - timedelta(seconds=1)).isoformat()
    before = (middle_at + timedelta(seconds=1)).isoformat()
    assert [i["id"] for i in listing(created_after=after)["items"]] == [late["id"], middle["id"]]
    assert [i["id"] for i in listing(created_before=before)["items"]] == [middle["id"], early["id"]]
    window = listing(created_after=after, created_before=before)
    assert [i["id"] for i in window["items"]] == [middle["id"]]
    # The created_at string itself is an inclusive bound on both sides.
    exact = listing(created_after=middle["created_at"], created_before=middle["created_at"])
    assert [i["id"] for i in exact["items"]] == [middle["id"]]

    assert [i["id"] for i in listing(status="completed")["items"]] == [middle["id"], early["id"]]
    assert listing(model="some/other-model")["total"] == 0
    paged = listing(page=2, page_size=2)
    assert paged["total"] == 3 and [i["id"] for i in paged["items"]] == [early["id"]]


@pytest.mark.parametrize("query", [{"page_size": 101}, {"page_size": 0}, {"page": 0}, {"created_after": "yesterday"}])
def test_list_rejects_bad_queries_with_400(client, query):
    response = client.post("/api/v3/predictions", json=query, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["code"] == 400


def test_list_accepts_page_size_100(client):
    assert client.post("/api/v3/predictions", json={"page_size": 100}, headers=AUTH).status_code == 200


# --- cancel -----------------------------------------------------------------------------------------------


def test_cancel_stops_a_running_task_and_it_stays_cancelled(client, clock):
    prediction_id = submit(client).json()["data"]["id"]
    clock.advance(2)
    response = client.delete(f"/api/v3/predictions/{prediction_id}", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["code"] == 200
    clock.advance(100)
    prediction = result(client, prediction_id).json()["data"]
    assert prediction["status"] == "cancelled" and prediction["outputs"] == []
    assert client.get(f"/outputs/{prediction_id}/0.png").status_code == 404
    assert stats(client)["cancels"] == 1


def test_cancel_of_unknown_or_finished_task_is_refused(client, clock):
    assert client.delete("/api/v3/predictions/" + "f" * 32, headers=AUTH).status_code == 404
    prediction_id = submit(client).json()["data"]["id"]
    clock.advance(10)
    assert client.delete(f"/api/v3/predictions/{prediction_id}", headers=AUTH).status_code == 400
    assert result(client, prediction_id).json()["data"]["status"] == "completed"


# --- admin ------------------------------------------------------------------------------------------------


def test_put_config_turns_faults_on_and_off_at_runtime(client):
    updated = client.put("/_sandbox/config", json={"submit_error_rate": 1.0, "submit_error_status": 503})
    assert updated.status_code == 200
    assert updated.json()["submit_error_rate"] == 1.0
    assert client.get("/_sandbox/config").json()["submit_error_status"] == 503
    assert submit(client).status_code == 503

    client.put("/_sandbox/config", json={"submit_error_rate": 0.0})
    assert submit(client).status_code == 200
    assert client.get("/_sandbox/config").json()["latency"] == 10.0  # untouched fields keep their values


@pytest.mark.parametrize(
    "change", [{"fail_rate": 2}, {"latency": -1}, {"no_such_field": 1}, {"outage": "yes"}, {"submit_error_status": 200}]
)
def test_put_config_rejects_invalid_changes_and_keeps_the_old_config(client, change):
    before = client.get("/_sandbox/config").json()
    response = client.put("/_sandbox/config", json=change)
    assert response.status_code == 400
    assert client.get("/_sandbox/config").json() == before


def test_stats_count_requests_and_list_tasks_and_reset_clears_them(client, clock):
    prediction_id = submit(client, prompt="count me", seed=9, size="600*700").json()["data"]["id"]
    submit(client, prompt="y" * 200)
    result(client, prediction_id)
    result(client, prediction_id)
    clock.advance(10)
    client.get(f"/outputs/{prediction_id}/0.png")
    client.delete(f"/api/v3/predictions/{prediction_id}", headers=AUTH)

    counts = stats(client)
    assert counts["submissions"] == 1
    assert counts["submit_requests"] == 2
    assert counts["result_requests"] == 2
    assert counts["downloads"] == 1
    assert counts["cancels"] == 1
    [task] = counts["tasks"]
    assert task["id"] == prediction_id
    assert (task["prompt"], task["seed"], task["size"], task["status"]) == ("count me", 9, "600*700", "completed")
    assert task["created_at"].endswith("Z")

    assert client.post("/_sandbox/reset").status_code == 200
    cleared = stats(client)
    assert cleared["submissions"] == cleared["submit_requests"] == cleared["result_requests"] == 0
    assert cleared["tasks"] == []
    assert result(client, prediction_id).status_code == 404


# --- command line ---------------------------------------------------------------------------------------------


def test_flags_win_over_environment_which_wins_over_defaults():
    environ = {"SANDBOX_LATENCY": "0.5", "SANDBOX_FAIL_RATE": "0.25", "SANDBOX_PORT": "9001", "SANDBOX_OUTAGE": "1"}
    host, port, config = parse_args(["--latency", "3", "--seed", "5"], environ)
    assert (host, port) == ("127.0.0.1", 9001)
    assert config.latency == 3.0
    assert config.fail_rate == 0.25
    assert config.seed == 5
    assert config.outage is True
    assert config.submit_error_status == 500

    _, port, defaults = parse_args([], {})
    assert port == 8900 and defaults == SandboxConfig()


def test_invalid_flag_values_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--fail-rate", "1.5"], {})
    with pytest.raises(SystemExit):
        parse_args([], {"SANDBOX_LATENCY": "fast"})


# --- the real server ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_real_server_serves_submit_poll_and_download_over_http():
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.devtools.sandbox", "--port", str(port), "--latency", "0.3", "--api-key", "k-123"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(base_url=base, timeout=5.0) as http:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None, process.stderr.read().decode()
                try:
                    if http.get("/_sandbox/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "sandbox did not start"
                time.sleep(0.05)

            headers = {"Authorization": "Bearer k-123"}
            submitted = http.post(SUBMIT, json={"prompt": "p", "image": IMAGE_URL, "size": "512*512"}, headers=headers)
            assert submitted.status_code == 200
            prediction = submitted.json()["data"]
            assert prediction["urls"]["get"] == f"{base}/api/v3/predictions/{prediction['id']}/result"

            deadline = time.monotonic() + 10
            while prediction["status"] != "completed":
                assert time.monotonic() < deadline, f"stuck in {prediction['status']}"
                time.sleep(0.1)
                prediction = http.get(prediction["urls"]["get"], headers=headers).json()["data"]

            [url] = prediction["outputs"]
            assert url == f"{base}/outputs/{prediction['id']}/0.png"
            download = http.get(url)
            assert download.status_code == 200
            assert Image.open(io.BytesIO(download.content)).size == (512, 512)
            assert http.get("/_sandbox/stats").json()["submissions"] == 1
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# --- outputs: an edit of the input, or flat ------------------------------------------------------


def completed_output(client: TestClient, clock: FakeClock, **body) -> tuple[str, bytes]:
    prediction_id = submit(client, size="512*512", **body).json()["data"]["id"]
    clock.advance(10)
    response = client.get(f"/outputs/{prediction_id}/0.png")
    assert response.status_code == 200
    return prediction_id, response.content


def test_output_is_an_edit_of_the_fetched_input(clock):
    inputs = FakeInputs()
    other_url = "http://127.0.0.1:9/other.png"
    inputs.images[other_url] = png_bytes((20, 40, 220))
    client = make_client(clock, inputs)

    _, first = completed_output(client, clock, prompt="make it blue", seed=5)
    _, second = completed_output(client, clock, prompt="make it blue", seed=5, image=other_url)

    assert inputs.fetched == [IMAGE_URL, other_url]
    assert first == render_edit(inputs.images[IMAGE_URL], "make it blue", 5, 512, 512)
    assert second == render_edit(inputs.images[other_url], "make it blue", 5, 512, 512)
    assert first != second  # the output follows the input, not only the prompt


def test_an_inline_base64_input_is_edited_without_fetching(clock):
    inputs = FakeInputs()
    client = make_client(clock, inputs)
    inline = png_bytes((10, 200, 10))

    _, output = completed_output(client, clock, prompt="p", seed=1, image="data:image/png;base64," + base64.b64encode(inline).decode())

    assert inputs.fetched == []
    assert output == render_edit(inline, "p", 1, 512, 512)


def test_flat_outputs_are_the_solid_colour_png_and_fetch_nothing(clock):
    inputs = FakeInputs()
    client = make_client(clock, inputs, outputs="flat")

    prediction_id, output = completed_output(client, clock, prompt="p", seed=2)

    assert inputs.fetched == []
    assert output == render_png("p", 2, prediction_id, 512, 512)
    assert len(Image.open(io.BytesIO(output)).getcolors() or []) == 1


def test_outputs_mode_is_fixed_at_submit(clock):
    client = make_client(clock)
    prediction_id = submit(client, prompt="p", seed=2, size="512*512").json()["data"]["id"]
    assert client.put("/_sandbox/config", json={"outputs": "flat"}).status_code == 200
    clock.advance(10)
    output = client.get(f"/outputs/{prediction_id}/0.png").content
    assert output == render_edit(FakeInputs().images[IMAGE_URL], "p", 2, 512, 512)


def test_outputs_flag_and_config_refuse_an_unknown_kind(clock):
    assert parse_args(["--outputs", "flat"], environ={})[2].outputs == "flat"
    assert parse_args([], environ={})[2].outputs == "edit"
    with pytest.raises(SystemExit):
        parse_args(["--outputs", "sepia"], environ={})
    response = make_client(clock).put("/_sandbox/config", json={"outputs": "fancy"})
    assert response.status_code == 400 and "outputs" in response.json()["message"]
