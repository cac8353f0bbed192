"""The metrics recorder (in-memory sums, bounded labels, histogram buckets) and its flush to the
fleet's totals (MemoryTotals here; the Redis hash: tests/integration/test_metrics.py)."""

from __future__ import annotations

import redis

from worker.adapters.telemetry import (
    CATALOG,
    END_TO_END,
    JOBS_CREATED,
    JOBS_FINISHED,
    QUEUE_WAIT,
    Flusher,
    MemoryTotals,
    Recorder,
    field,
    flush,
    parse_field,
)


def test_counters_sum_in_memory_until_taken():
    recorder = Recorder(tenants={"acme"})
    recorder.job_created("acme")
    recorder.job_created("acme")
    recorder.job_created("someone-else")

    deltas = recorder.take()

    assert deltas == {field(JOBS_CREATED.name, {"tenant": "acme"}): 2.0, field(JOBS_CREATED.name, {"tenant": "other"}): 1.0}
    assert recorder.take() == {}  # taken once


def test_tenants_not_listed_share_the_other_label_and_no_job_id_ever_becomes_a_label():
    recorder = Recorder(tenants={"acme"})
    for i in range(50):
        recorder.job_created(f"tenant-{i}")
        recorder.job_moved("processing", "failed", tenant=f"tenant-{i}", error_code="provider_failed", age_seconds=float(i))
    labels = [parse_field(key) for key in recorder.take()]

    values = {value for parsed in labels if parsed for value in parsed[1].values()}
    assert {v for v in values if v.startswith("tenant-")} == set()
    names_and_labels = {(name, tuple(sorted(lbl))) for name, lbl in (p for p in labels if p)}
    allowed = {m.name: set(m.labels) for m in CATALOG}
    for name, keys in names_and_labels:
        base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        assert set(keys) - {"le"} <= allowed[base], (name, keys)
        assert "job_id" not in keys


def test_a_finished_job_counts_by_state_and_code_and_observes_its_age():
    recorder = Recorder()
    recorder.job_moved("submitting", "processing", tenant=None, error_code=None, age_seconds=0.7)
    recorder.job_moved("processing", "failed", tenant=None, error_code="provider_failed", age_seconds=12.0)
    recorder.job_moved("uploading", "succeeded", tenant=None, error_code="stale code", age_seconds=4000.0)

    deltas = recorder.take()

    assert deltas[field(QUEUE_WAIT.name + "_bucket", {"le": "1.0"})] == 1.0
    assert deltas[field(QUEUE_WAIT.name + "_count", {})] == 1.0
    assert deltas[field(JOBS_FINISHED.name, {"state": "failed", "error_code": "provider_failed", "tenant": "other"})] == 1.0
    # Only a failure carries its code.
    assert deltas[field(JOBS_FINISHED.name, {"state": "succeeded", "error_code": "", "tenant": "other"})] == 1.0
    assert deltas[field(END_TO_END.name + "_bucket", {"state": "failed", "le": "20.0"})] == 1.0
    assert deltas[field(END_TO_END.name + "_bucket", {"state": "succeeded", "le": "+Inf"})] == 1.0  # past the last bound
    assert deltas[field(END_TO_END.name + "_sum", {"state": "succeeded"})] == 4000.0
    # Other non-terminal moves count as transitions and observe nothing.
    other = Recorder()
    other.job_moved("queued", "submitting", tenant=None, error_code=None, age_seconds=0.1)
    assert list(other.take()) == [field("edit_worker_transitions_total", {"from_state": "queued", "to_state": "submitting"})]


def test_flush_adds_deltas_to_the_totals_and_keeps_them_when_the_store_fails():
    recorder, totals = Recorder(), MemoryTotals()
    recorder.provider_call("submit", "ok")
    assert flush(recorder, totals) == 1
    recorder.provider_call("submit", "ok")
    flush(recorder, totals)
    key = field("edit_worker_provider_requests_total", {"operation": "submit", "outcome": "ok"})
    assert totals.read() == {key: 2.0}

    class Down:
        def add(self, deltas):
            raise redis.ConnectionError("down")

        def read(self):
            return {}

    recorder.provider_call("submit", "ok")
    assert flush(recorder, Down()) == 0  # type: ignore[arg-type]
    flush(recorder, totals)  # the kept delta arrives with the next flush
    assert totals.read() == {key: 3.0}


def test_the_flusher_flushes_once_more_when_stopped():
    recorder, totals = Recorder(), MemoryTotals()
    flusher = Flusher(lambda: flush(recorder, totals), interval=3600).start()
    recorder.callback_delivery("delivered", 2)

    flusher.stop()

    assert totals.read() == {field("edit_worker_callback_deliveries_total", {"outcome": "delivered"}): 2.0}


def test_every_counter_ends_in_total_and_every_histogram_is_in_seconds():
    for metric in CATALOG:
        assert metric.name.startswith("edit_worker_")
        if metric.kind == "counter":
            assert metric.name.endswith("_total")
        else:
            assert metric.kind == "histogram" and metric.name.endswith("_seconds") and metric.buckets
