"""The API's metrics: the fleet's flushed totals turned into Prometheus families, the Redis
gauges, and the generated reference (docs/metrics.md)."""

from __future__ import annotations

from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, generate_latest

from worker.adapters.breaker import MemoryBreaker
from worker.adapters.fleet import MemoryFleet
from worker.adapters.telemetry import CATALOG, MemoryTotals, Recorder, flush
from worker.metrics import ALL_METRICS, Metrics, TotalsCollector, exported_names, reference

ROOT = Path(__file__).resolve().parents[3]


def scrape(collector: TotalsCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_flushed_histogram_buckets_are_served_cumulative_with_sum_and_count():
    recorder, totals = Recorder(), MemoryTotals()
    for age in (0.3, 0.8, 7.0):
        recorder.job_moved("submitting", "processing", tenant=None, error_code=None, age_seconds=age)
    flush(recorder, totals)

    text = scrape(TotalsCollector(totals))

    assert 'edit_worker_job_queue_wait_seconds_bucket{le="0.5"} 1.0' in text
    assert 'edit_worker_job_queue_wait_seconds_bucket{le="1.0"} 2.0' in text
    assert 'edit_worker_job_queue_wait_seconds_bucket{le="5.0"} 2.0' in text
    assert 'edit_worker_job_queue_wait_seconds_bucket{le="10.0"} 3.0' in text
    assert 'edit_worker_job_queue_wait_seconds_bucket{le="+Inf"} 3.0' in text
    assert "edit_worker_job_queue_wait_seconds_count 3.0" in text
    assert "edit_worker_job_queue_wait_seconds_sum 8.1" in text


def test_totals_from_several_processes_add_up():
    totals = MemoryTotals()
    for _ in range(3):  # three worker processes, each flushing its own recorder
        recorder = Recorder()
        recorder.provider_call("result", "transient")
        flush(recorder, totals)

    text = scrape(TotalsCollector(totals))

    assert 'edit_worker_provider_requests_total{operation="result",outcome="transient"} 3.0' in text


def test_every_catalog_family_is_present_before_anything_happened():
    text = scrape(TotalsCollector(MemoryTotals(), fleet=MemoryFleet(), breaker=MemoryBreaker()))

    for metric in CATALOG:
        assert f"# TYPE {metric.name} {metric.kind}" in text
    assert "edit_worker_workers_alive 0.0" in text
    assert "edit_worker_breaker_open 0.0" in text
    assert "edit_worker_metrics_redis_up 1.0" in text


def test_a_redis_that_is_down_is_reported_not_raised():
    class Down:
        def read(self):
            raise redis.ConnectionError("down")

    text = scrape(TotalsCollector(Down()))  # type: ignore[arg-type]

    assert "edit_worker_metrics_redis_up 0.0" in text
    assert "edit_worker_jobs_created_total" not in text


def test_every_served_name_is_in_the_reference_and_the_catalog():
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry, totals=TotalsCollector(MemoryTotals(), fleet=MemoryFleet(), breaker=MemoryBreaker()))
    served = {sample.name for family in metrics.registry.collect() for sample in family.samples}

    assert served <= exported_names()
    assert len({m.name for m in ALL_METRICS}) == len(ALL_METRICS)


def test_the_metrics_reference_is_up_to_date():
    # Regenerate with: python -m worker.metrics > docs/metrics.md
    assert (ROOT / "docs" / "metrics.md").read_text() == reference()
