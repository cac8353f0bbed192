"""The pipeline on real parts: PostgreSQL, redis-server, moto's S3 server, the sandbox provider and
real `edit-worker worker` processes."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("poll_mode", ["batch", "task"])
def test_twenty_four_jobs_succeed_with_byte_equal_outputs_and_one_submission_each(cluster, sample_image, poll_mode):
    cluster.env["EDIT_WORKER_POLL_MODE"] = poll_mode
    cluster.start_worker("w1", concurrency=2)
    cluster.start_worker("w2", concurrency=2)
    cluster.start_beat()
    jobs = [cluster.submit(str(sample_image), f"integration edit number {i}", size="512*512", seed=i) for i in range(24)]
    assert len({j.id for j in jobs}) == 24

    done = cluster.wait_all_terminal(24, timeout=120)

    assert sorted(j.state for j in done) == ["succeeded"] * 24
    checked = sum(cluster.assert_outputs_byte_equal(j) for j in done)
    assert checked > 0
    cluster.assert_one_submission_per_job(done)
    assert all(j.attempts == 1 for j in done)
    logs = "".join(p.log_tail(10_000_000) for p in cluster.processes)
    if poll_mode == "batch":
        assert "edit_worker.poll_due[" in logs and "edit_worker.poll[" not in logs
    else:
        assert "edit_worker.poll[" in logs and "edit_worker.poll_due[" not in logs
    # Polls per job stay near the provider's latency / the poll interval (1 s latency, first poll at 1 s).
    stats = cluster.sandbox_stats()
    assert stats["result_requests"] <= 24 * 3, stats["result_requests"]


def test_cli_drives_the_whole_flow(cluster, sample_image):
    """migrate, worker, beat, submit --json, status --json, list --json — as an operator would."""
    cluster.cli("migrate")
    cluster.start_worker("w1", concurrency=2)
    cluster.start_beat()
    first = json.loads(
        cluster.cli(
            "submit",
            "--image",
            str(sample_image),
            "--prompt",
            "cli edit",
            "--size",
            "640*640",
            "--seed",
            "7",
            "--idempotency-key",
            "order-42",
            "--json",
        ).stdout
    )
    again = json.loads(
        cluster.cli(
            "submit",
            "--image",
            str(sample_image),
            "--prompt",
            "cli edit",
            "--size",
            "640*640",
            "--seed",
            "7",
            "--idempotency-key",
            "order-42",
            "--json",
        ).stdout
    )
    assert again["id"] == first["id"], "the same idempotency key must give the same job"
    assert set(first) == {
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
        # DESIGN §4 additions (tenants, callbacks, result links, cost)
        "tenant",
        "priority",
        "callback_url",
        "output_urls",
        "paid_submissions",
        "cost",
    }

    waited = cluster.cli("wait", first["id"], "--timeout", "60", check=False)
    assert waited.returncode == 0, waited.stdout + waited.stderr

    status = json.loads(cluster.cli("status", first["id"], "--json").stdout)
    assert status["state"] == "succeeded"
    assert status["size"] == "640*640" and status["seed"] == 7 and status["idempotency_key"] == "order-42"
    assert status["outputs"] == [f"s3://{cluster.settings.s3_bucket}/edits/{first['id']}/0.png"]
    listed = json.loads(cluster.cli("list", "--state", "succeeded", "--json").stdout)
    assert [j["id"] for j in listed] == [first["id"]]
    jobs = cluster.jobs()
    cluster.assert_outputs_byte_equal(jobs[0])
    cluster.assert_one_submission_per_job(jobs)


@pytest.mark.worker_env(EDIT_WORKER_BASE64_OUTPUT="true")
def test_base64_outputs_are_decoded_into_s3(cluster, sample_image):
    cluster.start_worker("w1", concurrency=2)
    for i in range(3):
        cluster.submit(str(sample_image), f"base64 edit {i}", size="512*512")
    done = cluster.wait_all_terminal(3, timeout=60)
    for job in done:
        cluster.assert_outputs_byte_equal(job)
    cluster.assert_one_submission_per_job(done)


def test_failed_task_is_a_dead_letter_that_retry_replays(cluster, sample_image):
    cluster.sandbox_config(fail_rate=1.0)
    cluster.start_worker("w1", concurrency=2)
    job = cluster.submit(str(sample_image), "this one fails at the provider", size="512*512")
    [failed] = cluster.wait_all_terminal(1, timeout=60)
    assert failed.state == "failed"
    assert failed.error_code == "task_failed" and "injected" in failed.error_message

    cluster.sandbox_config(fail_rate=0.0)
    replay = cluster.cli("retry", job.id, "--json")
    assert json.loads(replay.stdout)["state"] == "queued"
    [done] = cluster.wait_all_terminal(1, timeout=60)
    assert done.state == "succeeded"
    assert done.attempts == 2
    cluster.assert_outputs_byte_equal(done)
    events = json.loads(cluster.cli("status", job.id, "--json", "--events").stdout)["events"]
    assert [e["to"] for e in events] == [
        "queued",
        "submitting",
        "processing",
        "failed",
        "queued",
        "submitting",
        "processing",
        "uploading",
        "succeeded",
    ]


def test_bad_input_exits_2_and_writes_nothing(cluster, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    cases = [
        ["--image", str(not_an_image), "--prompt", "x"],
        ["--image", "http://127.0.0.1/secret.png", "--prompt", "x"],
        ["--image", str(not_an_image), "--prompt", "x" * 121],
    ]
    for args in cases:
        result = cluster.cli("submit", *args, check=False)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "error:" in result.stderr
    assert cluster.jobs() == []
