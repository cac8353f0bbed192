"""Specification of the `edit-worker` command line for what needs no broker: bad input exits 2
with a one-line error and writes nothing; status and list read the database."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from models import Job, Outbox
from worker.cli import app
from worker.config import get_settings

ENV_NAMES = [
    "WAVESPEED_API_KEY",
    "WAVESPEED_BASE_URL",
    "CELERY_BROKER_URL",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "S3_PREFIX",
    "EDIT_WORKER_ALLOW_PRIVATE_URLS",
    "EDIT_WORKER_MAX_IMAGE_BYTES",
    "EDIT_WORKER_CRASHPOINT",
]


@pytest.fixture
def cli(database_url, monkeypatch, tmp_path):
    """A CliRunner whose process settings point at this test's migrated SQLite file."""
    monkeypatch.chdir(tmp_path)  # no stray .env file is read
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:9/0")  # nothing must try to publish
    get_settings.cache_clear()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    yield invoke
    get_settings.cache_clear()  # monkeypatch restores the environment after this


def job_count(sessions) -> tuple[int, int]:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Job)), s.scalar(select(func.count()).select_from(Outbox))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--prompt", "x" * 121], ["121 characters"]),
        (["--prompt", "ok", "--size", "4096*4096"], ["4096"]),
        (["--prompt", "ok", "--size", "abc"], ["W*H"]),
        (["--prompt", "ok", "--seed", "-7"], ["seed -7"]),
        (["--prompt", ""], ["prompt is required"]),
    ],
)
def test_submit_with_bad_input_exits_2_with_one_line_and_writes_no_job(cli, sessions, png_file, extra, fragments):
    result = cli("submit", "--image", str(png_file), *extra)
    assert_one_line_error(result, *fragments)
    assert job_count(sessions) == (0, 0)


def test_submit_with_a_missing_file_exits_2(cli, sessions, tmp_path):
    result = cli("submit", "--image", str(tmp_path / "missing.png"), "--prompt", "ok")
    assert_one_line_error(result, "does not exist")
    assert job_count(sessions) == (0, 0)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/cat.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png", "http://10.0.0.1/cat.png"]
)
def test_submit_with_a_private_url_exits_2(cli, sessions, url):
    result = cli("submit", "--image", url, "--prompt", "ok")
    assert_one_line_error(result, "non-public address")
    assert job_count(sessions) == (0, 0)


def test_submit_with_a_gif_exits_2(cli, sessions, tmp_path, make_image):
    gif = tmp_path / "a.gif"
    gif.write_bytes(make_image("GIF"))
    assert_one_line_error(cli("submit", "--image", str(gif), "--prompt", "ok"), "GIF")
    assert job_count(sessions) == (0, 0)


def test_submit_without_an_image_exits_2(cli, sessions):
    assert_one_line_error(cli("submit", "--prompt", "ok"), "--image is required")
    assert job_count(sessions) == (0, 0)


def test_submit_from_a_file_with_one_bad_line_writes_nothing(cli, sessions, tmp_path, png_file):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"image": str(png_file), "prompt": "fine"}) + "\n" + json.dumps({"image": str(png_file), "prompt": "y" * 121}) + "\n"
    )
    assert_one_line_error(cli("submit", "--from-file", str(jobs)), "item 2")
    assert job_count(sessions) == (0, 0)


def test_status_of_an_unknown_job_exits_2(cli):
    assert_one_line_error(cli("status", "00000000-0000-0000-0000-000000000000"), "no job")


def test_status_json_prints_the_job_object(cli, new_job):
    job_id = new_job(prompt="make it night", idempotency_key="k-1")
    result = cli("status", job_id, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["id"] == job_id and data["state"] == "queued" and data["prompt"] == "make it night"
    assert data["idempotency_key"] == "k-1" and data["error"] is None and data["outputs"] == []


def test_status_json_with_events_lists_the_history(cli, new_job):
    job_id = new_job()
    data = json.loads(cli("status", job_id, "--json", "--events").stdout)
    assert [(e["from"], e["to"]) for e in data["events"]] == [(None, "queued")]


def test_list_json_prints_a_json_list(cli, new_job, clock):
    first = new_job(prompt="first")
    clock.advance(1)
    second = new_job(prompt="second")
    result = cli("list", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    assert [j["id"] for j in data] == [second, first]
    assert all(j["state"] == "queued" for j in data)


def test_list_json_of_an_empty_database_is_an_empty_list(cli):
    result = cli("list", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_list_filters_by_state(cli, new_job):
    new_job()
    assert json.loads(cli("list", "--json", "--state", "failed").stdout) == []
    assert len(json.loads(cli("list", "--json", "--state", "queued").stdout)) == 1


def test_list_with_an_unknown_state_exits_2(cli):
    assert_one_line_error(cli("list", "--state", "exploded"), "unknown state")


def test_callbacks_list_shows_a_jobs_deliveries(cli, new_job, sessions, clock):
    from sqlalchemy import update

    from worker.core.jobs import transition
    from worker.core.states import State

    job_id = new_job()
    with sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(callback_url="https://producer.example.com/hook"))
        transition(s, job_id, State.QUEUED, State.CANCELLED, "test", clock=clock.now)
        s.commit()
    [delivery] = json.loads(cli("callbacks", "list", job_id, "--json").stdout)
    assert (delivery["job_id"], delivery["event"], delivery["status"]) == (job_id, "cancelled", "pending")
    assert delivery["webhook_id"].startswith("msg_")
    assert json.loads(cli("callbacks", "list", new_job(), "--json").stdout) == []


def test_callbacks_list_of_an_unknown_job_exits_2(cli):
    assert_one_line_error(cli("callbacks", "list", "no-such-job"), "no job")


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "give a delivery id"),
        (["7", "--failed"], "give a delivery id"),
        (["--job", "j", "--since", "2h"], "--since goes with --failed"),
    ],
)
def test_callbacks_redeliver_needs_exactly_one_target(cli, args, fragment):
    assert_one_line_error(cli("callbacks", "redeliver", *args), fragment)
