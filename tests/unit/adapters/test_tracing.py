"""The tracing adapter: each admitted job starts its own trace, a step's span is a child of the
traceparent the job's row keeps, attributes and errors are recorded, and off (the default) loads no
OpenTelemetry module at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from worker.adapters import tracing
from worker.adapters.tracing import NoTracing, OtelTracing, from_settings, traces_url
from worker.config import Settings, settings_from_env

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(exporter) -> OtelTracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelTracing(provider)


def by_name(exporter: InMemorySpanExporter, job_id: str) -> dict:
    return {span.name: span for span in exporter.get_finished_spans() if span.attributes.get("job.id") == job_id}


def test_each_admitted_job_starts_its_own_trace_and_its_steps_are_children_of_the_stored_traceparent(traced, exporter):
    first, second = traced.admit("job-1", "acme"), traced.admit("job-2", "acme")
    first.set(outcome="created")
    first.end()
    second.end()
    # What another process does: only the stored traceparent links its span to the job.
    with traced.step(tracing.SUBMIT, first.trace_parent, job_id="job-1", tenant="acme", attempt=1) as span:
        span.set(outcome="accepted", prediction_id="pred-1")

    one, two = by_name(exporter, "job-1"), by_name(exporter, "job-2")
    admit, submit = one[tracing.ADMIT], one[tracing.SUBMIT]
    assert admit.parent is None and two[tracing.ADMIT].parent is None
    assert admit.context.trace_id != two[tracing.ADMIT].context.trace_id
    assert submit.context.trace_id == admit.context.trace_id
    assert submit.parent.span_id == admit.context.span_id
    assert first.trace_parent.startswith(f"00-{admit.context.trace_id:032x}-{admit.context.span_id:016x}-")
    assert dict(submit.attributes) == {"job.id": "job-1", "tenant": "acme", "attempt": 1, "outcome": "accepted", "prediction.id": "pred-1"}
    assert admit.attributes["outcome"] == "created"


def test_a_step_without_a_stored_trace_is_a_root_span_of_its_own(traced, exporter):
    with traced.step(tracing.POLL, None, job_id="old-job", prediction_id=None):
        pass
    [span] = exporter.get_finished_spans()
    assert span.parent is None and dict(span.attributes) == {"job.id": "old-job"}  # None values are left out


def test_an_exception_leaving_a_step_is_recorded_and_raised(traced, exporter):
    root = traced.admit("job-1", "default")
    with pytest.raises(RuntimeError, match="S3 is down"), traced.step(tracing.COPY, root.trace_parent, job_id="job-1"):
        raise RuntimeError("S3 is down")
    [span] = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


def test_a_handled_error_is_recorded_on_the_span(traced, exporter):
    with traced.step(tracing.SUBMIT, None, job_id="job-1") as span:
        span.error(ValueError("provider answered 502"))
        span.set(outcome="retry")
    [recorded] = exporter.get_finished_spans()
    assert recorded.status.status_code == StatusCode.ERROR
    assert recorded.attributes["outcome"] == "retry"
    assert recorded.events[0].attributes["exception.type"] == "ValueError"


def test_the_trace_id_of_a_traceparent_is_what_logs_show(traced):
    root = traced.admit("job-1", "default")
    assert traced.trace_id(root.trace_parent) == root.trace_parent.split("-")[1]
    assert traced.trace_id(None) is None
    assert NoTracing().trace_id(root.trace_parent) is None


def test_off_every_span_is_one_shared_no_op():
    off = NoTracing()
    admit = off.admit("job-1", "default")
    assert admit.trace_parent is None
    with off.step(tracing.SUBMIT, None, job_id="job-1") as span:
        span.set(outcome="accepted")
        span.error(ValueError("x"))
    assert span is admit and not off.enabled


def loaded_after(code: str) -> list[str]:
    """The opentelemetry modules a fresh interpreter holds after running `code` (no OTEL_* set)."""
    code += "\nimport sys\nprint(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EDIT_WORKER_OTLP"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return eval(out.stdout.strip().splitlines()[-1])  # a list literal printed by the child


USE_DEFAULT = (
    "from worker.config import Settings\n"
    "from worker.adapters.tracing import shared_tracing\n"
    "t = shared_tracing(Settings(_env_file=None))\n"
    "assert type(t).__name__ == 'NoTracing'\n"
    "with t.step('job.submit', None, job_id='x') as s: s.set(outcome='accepted')\n"
)


def test_tracing_is_off_by_default_and_then_imports_no_opentelemetry_module():
    assert loaded_after(USE_DEFAULT) == []


def test_off_no_worker_process_loads_the_tracing_sdk_or_an_exporter():
    # redis-py (8.x, its own metrics) and FastAPI import parts of OpenTelemetry themselves when it
    # is installed; what tracing-off must never load is the tracing SDK, with its span processor
    # thread, or an exporter.
    loaded = loaded_after("import worker.api, worker.producer, worker.engine.tasks\n" + USE_DEFAULT)
    assert [m for m in loaded if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter"))] == []


def test_an_endpoint_turns_tracing_on_with_a_resource_naming_this_process():
    on = from_settings(Settings(_env_file=None, otlp_endpoint="http://127.0.0.1:4318", service_name="edits-eu"))  # type: ignore[call-arg]
    try:
        assert isinstance(on, OtelTracing)
        resource = on.provider.resource.attributes
        assert resource["service.name"] == "edits-eu" and resource["process.pid"] == os.getpid()
        assert len(str(resource["service.instance.id"])) == 36
    finally:
        on.shutdown()
    assert isinstance(from_settings(Settings(_env_file=None)), NoTracing)  # type: ignore[call-arg]


def test_the_standard_opentelemetry_variables_are_honoured():
    settings = settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "edits"})
    assert (settings.otlp_endpoint, settings.service_name) == ("http://collector:4318", "edits")
    ours = settings_from_env({"EDIT_WORKER_OTLP_ENDPOINT": "http://ours:4318", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://theirs:4318"})
    assert ours.otlp_endpoint == "http://ours:4318"  # the project's own name wins


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
    ],
)
def test_the_endpoint_is_a_base_url_as_in_opentelemetry(endpoint, url):
    assert traces_url(endpoint) == url
