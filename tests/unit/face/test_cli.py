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
        (["--prompt", "make it \x1b[31mred"], ["control characters"]),
        (["--prompt", "ok", "--idempotency-key", "k\x07"], ["idempotency key"]),
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
    assert_one_line_error(result, "private address")
    assert job_count(sessions) == (0, 0)


def test_submit_with_a_decompression_bomb_exits_2(cli, sessions, tmp_path, decompression_bomb):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(decompression_bomb)
    result = cli("submit", "--image", str(bomb), "--prompt", "ok")
    assert_one_line_error(result, "pixels")
    assert job_count(sessions) == (0, 0)


def test_a_plain_http_remote_provider_is_a_one_line_error(cli, monkeypatch, png_file):
    monkeypatch.setenv("WAVESPEED_BASE_URL", "http://api.wavespeed.ai")
    get_settings.cache_clear()
    result = cli("submit", "--image", str(png_file), "--prompt", "ok")
    assert_one_line_error(result, "WAVESPEED_BASE_URL must use https://")


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


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(cli, sessions):
    from models import ApiKey
    from worker.core import tenants

    result = cli("keys", "create", "--tenant", "shop", "--json")
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    assert set(created) >= {"tenant", "key", "webhook_secret"} and created["tenant"] == "shop"
    assert created["key"].startswith("ewk_") and created["webhook_secret"].startswith("whsec_")
    with sessions() as s:
        stored = s.scalars(select(ApiKey)).all()
    assert len(stored) == 1 and created["key"] not in (stored[0].key_hash, stored[0].id)
    assert tenants.authenticate(sessions, created["key"]).tenant == "shop"
    listed = cli("keys", "list", "--json")
    assert created["key"] not in listed.stdout and json.loads(listed.stdout)[0]["tenant"] == "shop"
    assert cli("keys", "revoke", created["id"]).exit_code == 0
    assert tenants.authenticate(sessions, created["key"]) is None
    assert_one_line_error(cli("keys", "revoke", created["id"]), "no live key")


def test_a_bad_tenant_name_is_one_line_and_exit_2(cli):
    assert_one_line_error(cli("keys", "create", "--tenant", "Bad Name"), "tenant must be")


# An image URL the provider would fetch itself: admission stores no input, so no S3 is needed here.
IMAGE_URL = "http://127.0.0.1:9/cat.png"


def test_submit_takes_a_tenant_and_a_priority(cli, png_file, sessions, monkeypatch):
    monkeypatch.setenv("EDIT_WORKER_ALLOW_PRIVATE_URLS", "true")
    result = cli("submit", "--image", IMAGE_URL, "--prompt", "team edit", "--tenant", "team-b", "--priority", "high", "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert (job["tenant"], job["priority"]) == ("team-b", "high")
    assert [j["id"] for j in json.loads(cli("list", "--tenant", "team-b", "--json").stdout)] == [job["id"]]
    assert json.loads(cli("list", "--tenant", "nobody", "--json").stdout) == []
    assert_one_line_error(cli("submit", "--image", str(png_file), "--prompt", "x", "--priority", "urgent"), "priority must be")


def test_a_tenant_over_its_rate_is_refused_at_admission(cli, sessions, monkeypatch):
    monkeypatch.setenv("EDIT_WORKER_ALLOW_PRIVATE_URLS", "true")
    assert cli("tenants", "set", "team-c", "--rate-per-minute", "1").exit_code == 0
    assert cli("submit", "--image", IMAGE_URL, "--prompt", "first", "--tenant", "team-c").exit_code == 0
    refused = cli("submit", "--image", IMAGE_URL, "--prompt", "second", "--tenant", "team-c")
    assert refused.exit_code == 1 and "rate of 1 jobs per minute" in refused.stderr and "try again in" in refused.stderr
    usage = json.loads(cli("tenants", "usage", "--tenant", "team-c", "--json").stdout)
    assert usage[0]["by_state"] == {"queued": 1} and usage[0]["paid_today"] == 1


# --- prune ------------------------------------------------------------------------------------


@pytest.fixture
def fresh_deps():
    """`prune` builds the process's Deps from the environment: none left over from another test."""
    from worker.engine.deps import reset_deps

    reset_deps()
    yield
    reset_deps()


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "--finished-before is required"),
        (["--finished-before", "last month"], "age like 30d"),
        (["--finished-before", "2999-01-01"], "in the future"),
    ],
)
def test_prune_with_bad_arguments_exits_2_with_one_line_and_deletes_nothing(cli, sessions, new_job, fresh_deps, args, fragment):
    new_job()
    assert_one_line_error(cli("prune", *args), fragment)
    assert job_count(sessions) == (1, 1)


def test_prune_deletes_old_finished_jobs_and_prints_the_counts(cli, sessions, new_job, fresh_deps):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from worker.core.jobs import transition
    from worker.core.states import State

    old, recent, queued = new_job(prompt="old"), new_job(prompt="recent"), new_job(prompt="queued")
    with sessions() as session:
        for job_id in (old, recent):
            transition(session, job_id, State.QUEUED, State.CANCELLED, "test")
        session.execute(update(Job).where(Job.id == old).values(finished_at=datetime.now(timezone.utc) - timedelta(days=31)))
        session.commit()

    dry = cli("prune", "--finished-before", "30d", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout) | {"finished_before": None} == {
        "finished_before": None,
        "dry_run": True,
        "with_objects": False,
        "jobs": 1,
        "events": 2,
        "outbox": 1,
        "objects": 0,
    }
    assert job_count(sessions) == (3, 3)

    real = cli("prune", "--finished-before", "30d")
    assert real.exit_code == 0, real.output
    assert real.stdout.startswith("pruned 1 job(s) finished before ") and "2 event(s), 1 outbox row(s)" in real.stdout
    with sessions() as s:
        assert sorted(s.scalars(select(Job.id))) == sorted([recent, queued])


def test_submit_with_s3_down_exits_non_zero_with_one_line_and_writes_no_job(cli, sessions, png_file, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # refuses connections
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNITTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-s3-key")
    get_settings.cache_clear()

    result = cli("submit", "--image", str(png_file), "--prompt", "make it night")

    assert result.exit_code == 1, result.output  # transient: not a usage error, try again
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: object storage is unavailable"), result.stderr
    assert "super-secret-s3-key" not in result.output
    assert result.stdout == ""
    assert job_count(sessions) == (0, 0)


# --- worker start ----------------------------------------------------------------------------


@pytest.fixture
def old_redis_url():
    """A socket that speaks just enough RESP to say it is Redis 6.0.16 (no server process)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while not stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                if b"INFO" in data.upper():
                    body = b"# Server\r\nredis_version:6.0.16\r\nredis_mode:standalone\r\n"
                    conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                else:
                    conn.sendall(b"+OK\r\n")

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    listener.close()


def test_the_worker_refuses_a_redis_older_than_6_2_in_one_line(cli, monkeypatch, old_redis_url):
    monkeypatch.setenv("CELERY_BROKER_URL", old_redis_url)
    monkeypatch.delenv("EDIT_WORKER_REDIS_URL", raising=False)
    monkeypatch.setenv("EDIT_WORKER_SUPERVISE", "0")  # nothing may start: the check comes first
    get_settings.cache_clear()
    assert_one_line_error(cli("worker"), "Redis 6.0.16 is not supported", "6.2 or newer")


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


def test_since_takes_the_same_ages_and_times_as_prune_and_refuses_the_rest_in_one_line(cli):
    assert_one_line_error(cli("retry", "--since", "last week"), "--since must be an age like 30d, 12h, 2w")
    assert_one_line_error(cli("retry", "--since", "2999-01-01"), "--since '2999-01-01' is in the future")
    assert cli("retry", "--since", "2w").exit_code == 0  # nothing failed: nothing to replay


def test_a_database_without_its_schema_is_one_line_that_says_to_migrate(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite'}"}  # never migrated
    for args in (("keys", "create", "--tenant", "shop"), ("list",), ("status", "no-such-job")):
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: database:"), result.stderr
        assert "edit-worker migrate" in lines[0]
        assert result.stdout == ""
