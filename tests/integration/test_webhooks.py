"""WaveSpeed webhooks end to end: the sandbox calls each job's own signed webhook URL on the API,
which settles submits whose answers never arrived — with certainty, where the provider's task
list (no prompts) could not tell several concurrent ambiguous submits apart."""

from __future__ import annotations

import sys

import pytest

from worker.devtools import local

pytestmark = pytest.mark.integration

SECRET = "whsec_test-integration-not-a-secret"


@pytest.mark.worker_env(
    WAVESPEED_WEBHOOK_SECRET=SECRET, EDIT_WORKER_AMBIGUOUS_SKEW_SECONDS="2", EDIT_WORKER_AMBIGUOUS_LIST_GRACE_SECONDS="2"
)
def test_concurrent_ambiguous_submits_are_settled_by_the_providers_webhooks(cluster, sample_image):
    port = local.free_port()
    cluster.env["EDIT_WORKER_WEBHOOK_URL"] = f"http://127.0.0.1:{port}/webhooks/wavespeed"
    api = local.Service(
        "api", [sys.executable, "-m", "worker.cli", "api", "--port", str(port)], port, cluster.workdir / "api.log", env=cluster.env
    ).start()
    cluster.processes.append(api)
    # Every submit creates its task, then answers after 8 s: past the 5 s client timeout.
    cluster.sandbox_config(webhook_secret=SECRET, slow_submit_rate=1.0, slow_submit_seconds=8.0)
    cluster.start_worker("w1", concurrency=4)
    cluster.start_beat()

    jobs = [cluster.submit(str(sample_image), f"webhook-settled edit {i}", size="512*512") for i in range(6)]
    done = cluster.wait_all_terminal(len(jobs), timeout=90)

    assert [j.state for j in done] == ["succeeded"] * len(jobs), [(j.state, j.error_code) for j in done]
    for job in done:
        cluster.assert_outputs_byte_equal(job)
    cluster.assert_one_submission_per_job(done)
    assert cluster.sandbox_stats()["webhooks"] >= len(jobs)
    assert api.log_tail(1_000_000).count("named by the provider's webhook for this job") == len(jobs)
