"""Metrics across processes: real Celery workers count what they do, flush it to Redis, beat their
heartbeats, and the API's `/metrics` serves the fleet's totals (adapters/telemetry.py)."""

from __future__ import annotations

import warnings

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.api import create_app
from worker.core import tenants
from worker.core.steps import RecordingPublisher

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(scraped: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lbls), v in scraped.items() if n == name and all(dict(lbls).get(k) == want for k, want in labels.items()))


@pytest.mark.worker_env(EDIT_WORKER_METRICS_FLUSH_SECONDS="1", EDIT_WORKER_METRICS_TENANTS="default")
def test_jobs_run_by_real_workers_show_on_the_apis_metrics(cluster, sample_image):
    app = create_app(cluster.settings, publisher=RecordingPublisher())
    key = tenants.create_key(cluster.sessions(), "default", admin=True).key.get_secret_value()
    api = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    cluster.start_worker(concurrency=2)

    # One job the provider fails, then two it completes.
    cluster.sandbox_config(fail_rate=1.0)
    cluster.submit(str(sample_image), "metrics: this one fails")
    cluster.wait_until(lambda: cluster.sandbox_stats()["submissions"] >= 1, 60, "the first submission")
    cluster.sandbox_config(fail_rate=0.0)
    for i in range(2):
        cluster.submit(str(sample_image), f"metrics: this one succeeds {i}")
    jobs = cluster.wait_all_terminal(3)
    assert sorted(j.state for j in jobs) == ["failed", "succeeded", "succeeded"]

    def scraped_when_flushed():
        response = api.get("/metrics")
        assert response.status_code == 200
        scraped = samples(response.text)
        return scraped if total(scraped, "edit_worker_jobs_finished_total") >= 3 else None

    scraped = cluster.wait_until(scraped_when_flushed, 30, "the workers' flushed counts on /metrics")
    print("\n".join(f"{n}{dict(lbls)} {v}" for (n, lbls), v in sorted(scraped.items()) if v))  # for a failure's report

    assert total(scraped, "edit_worker_jobs_created_total", tenant="default") == 3
    assert total(scraped, "edit_worker_jobs_finished_total", state="succeeded", tenant="default", error_code="") == 2
    assert total(scraped, "edit_worker_jobs_finished_total", state="failed", tenant="default") == 1
    [failed] = [j for j in jobs if j.state == "failed"]
    assert total(scraped, "edit_worker_jobs_finished_total", state="failed", error_code=failed.error_code) == 1
    assert total(scraped, "edit_worker_jobs_finished_total") == 3  # counted once each, across processes
    assert total(scraped, "edit_worker_job_queue_wait_seconds_count") == 3
    assert total(scraped, "edit_worker_job_queue_wait_seconds_bucket", le="+Inf") == 3
    assert total(scraped, "edit_worker_job_duration_seconds_count", state="succeeded") == 2
    assert total(scraped, "edit_worker_job_duration_seconds_count", state="failed") == 1
    assert total(scraped, "edit_worker_provider_inference_seconds_count") == 2  # the completed predictions
    assert total(scraped, "edit_worker_provider_requests_total", operation="submit", outcome="ok") == 3
    assert total(scraped, "edit_worker_provider_requests_total", operation="result", outcome="ok") >= 3
    assert total(scraped, "edit_worker_workers_alive") == 2  # the two pool processes
    assert total(scraped, "edit_worker_metrics_redis_up") == 1
    assert total(scraped, "edit_worker_breaker_open") == 0
    # No label value is a job id.
    ids = {j.id for j in jobs} | {j.prediction_id for j in jobs}
    assert not any(value in ids for _, lbls in scraped for _, value in lbls)
