"""The operations files in deploy/ name only metrics the code exports (no promtool needed; the
rules' own tests run in .ci/check-deploy.sh)."""

from __future__ import annotations

import json

from worker.devtools.deploy_check import DASHBOARD, RULE_FILES, dashboard_exprs, names_in, problems, rule_exprs
from worker.metrics import exported_names


def test_the_dashboard_and_the_rules_use_only_exported_metrics():
    assert problems() == []


def test_every_alert_the_task_asks_for_is_there_and_queries_exported_metrics():
    text = RULE_FILES[0].read_text()
    for alert in (
        "EditWorkerBreakerOpen",
        "EditWorkerBacklogGrowing",
        "EditWorkerNoWorkerAlive",
        "EditWorkerFailureRatioHigh",
        "EditWorkerCallbacksFailing",
    ):
        assert f"alert: {alert}" in text
    exprs = rule_exprs(RULE_FILES[0])
    assert len(exprs) == text.count("alert: ")
    assert all(names_in(e) and names_in(e) <= exported_names() for e in exprs)


def test_the_dashboard_shows_the_histograms_the_gauges_and_the_counters():
    used = set().union(*(names_in(e) for e in dashboard_exprs()))
    for name in (
        "edit_worker_job_queue_wait_seconds_bucket",
        "edit_worker_provider_inference_seconds_bucket",
        "edit_worker_job_duration_seconds_bucket",
        "edit_worker_jobs_finished_total",
        "edit_worker_provider_requests_total",
        "edit_worker_workers_alive",
        "edit_worker_breaker_open",
        "edit_worker_outbox_backlog",
        "edit_worker_callback_deliveries_total",
    ):
        assert name in used


def test_an_unknown_metric_in_a_dashboard_is_reported(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][0]["targets"][0]["expr"] = "sum(edit_worker_jobs_createdd_total)"
    broken = tmp_path / "edit-worker.json"
    broken.write_text(json.dumps(dashboard))

    found = problems(broken, RULE_FILES)

    assert len(found) == 1 and "edit_worker_jobs_createdd_total is not a metric the code exports" in found[0]
