"""One trace per job, from admission (the producer) through submit, poll, copy and callback: each
step a child of the job's admission span, found through the traceparent its row keeps, even when
one batched pass handles many jobs."""

from __future__ import annotations

import base64
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import SecretStr
from sqlalchemy import update

from models import Job
from worker import producer
from worker.adapters import tracing
from worker.adapters.tracing import OtelTracing
from worker.core.jobs import get_job
from worker.engine import callbacks, poller, submitter

HOOK = "https://producer.example.com/hooks/edits"
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(exporter) -> OtelTracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelTracing(provider)


@pytest.fixture
def traced_deps(deps, traced):
    settings = deps.settings.model_copy(
        update={"poll_mode": "batch", "submit_mode": "batch", "submit_backpressure_seconds": 0.0, "callback_secret": SecretStr(SECRET)}
    )
    return dataclasses.replace(deps, settings=settings, tracing=traced)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def spans_of_trace(exporter: InMemorySpanExporter, trace_id: int) -> list:
    return [span for span in exporter.get_finished_spans() if span.context.trace_id == trace_id]


def admit_two(traced_deps, traced, png_file, publisher, storage) -> list[Job]:
    items = [{"image": str(png_file), "prompt": "one"}, {"image": str(png_file), "prompt": "two"}]
    return producer.submit_edit_many(items, settings=traced_deps.settings, publisher=publisher, storage=storage, tracing=traced)


def test_a_jobs_trace_holds_every_step_each_a_child_of_its_admission(
    traced_deps, traced, exporter, png_file, publisher, storage, sessions, clock, executor, fake_provider
):
    first, second = admit_two(traced_deps, traced, png_file, publisher, storage)
    with sessions() as session:
        session.execute(update(Job).where(Job.id == first.id).values(callback_url=HOOK))
        session.commit()
    clock.advance(1)
    assert submitter.submit_due(traced_deps, executor=executor).accepted == 2  # one batched pass
    clock.advance(traced_deps.settings.first_poll_delay)
    assert poller.poll_due(traced_deps, executor=executor).finished == 2  # one pass, copies inline
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(204)))
    report = callbacks.deliver_due(traced_deps, client=client, resolver=lambda host: ["93.184.216.34"], executor=executor)
    assert report.delivered == 1

    roots = {span.attributes["job.id"]: span for span in exporter.get_finished_spans() if span.name == tracing.ADMIT}
    assert roots.keys() == {first.id, second.id}
    assert roots[first.id].context.trace_id != roots[second.id].context.trace_id  # a trace per job, not per batch
    for job, expected in ((first, [tracing.ADMIT, tracing.SUBMIT, tracing.POLL, tracing.COPY, tracing.CALLBACK]), (second, None)):
        root = roots[job.id]
        row = get_job(sessions, job.id)
        assert row.trace_parent.split("-")[1:3] == [f"{root.context.trace_id:032x}", f"{root.context.span_id:016x}"]
        spans = spans_of_trace(exporter, root.context.trace_id)
        names = [span.name for span in spans]
        assert sorted(names) == sorted(expected or [tracing.ADMIT, tracing.SUBMIT, tracing.POLL, tracing.COPY])
        steps = [span for span in spans if span is not root]
        assert all(span.parent.span_id == root.context.span_id for span in steps)
        assert all(span.attributes["job.id"] == job.id and span.attributes["tenant"] == "default" for span in spans)
        by_name = {span.name: span for span in spans}
        assert by_name[tracing.ADMIT].attributes["outcome"] == "created"
        assert by_name[tracing.SUBMIT].attributes["outcome"] == "accepted"
        assert by_name[tracing.SUBMIT].attributes["attempt"] == 1
        assert by_name[tracing.SUBMIT].attributes["prediction.id"] == row.prediction_id
        assert by_name[tracing.POLL].attributes["outcome"] == "completed"
        assert by_name[tracing.COPY].attributes["outcome"] == "stored"
        assert by_name[tracing.COPY].attributes["prediction.id"] == row.prediction_id
    callback = next(span for span in exporter.get_finished_spans() if span.name == tracing.CALLBACK)
    assert callback.attributes["outcome"] == "delivered" and callback.attributes["http.response.status_code"] == 204


def test_a_failed_submit_is_an_error_span_in_the_jobs_trace_and_the_retry_joins_it(
    traced_deps, traced, exporter, png_file, publisher, storage, sessions, clock, fake_provider
):
    [job] = producer.submit_edit_many(
        [{"image": str(png_file), "prompt": "one"}], settings=traced_deps.settings, publisher=publisher, storage=storage, tracing=traced
    )
    fake_provider.script("submit", httpx.Response(502, text="<html>bad gateway</html>"))
    clock.advance(1)
    one = ThreadPoolExecutor(max_workers=1)
    report = submitter.submit_due(traced_deps, executor=one)
    clock.advance(report.next_due_in)
    assert submitter.submit_due(traced_deps, executor=one).accepted == 1

    [root] = [span for span in exporter.get_finished_spans() if span.name == tracing.ADMIT]
    assert root.attributes["job.id"] == job.id
    submits = [span for span in spans_of_trace(exporter, root.context.trace_id) if span.name == tracing.SUBMIT]
    assert [(s.attributes["attempt"], s.attributes["outcome"], s.status.status_code) for s in submits] == [
        (1, "retry", StatusCode.ERROR),
        (2, "accepted", StatusCode.UNSET),
    ]
    assert all(span.parent.span_id == root.context.span_id for span in submits)


def test_task_mode_steps_join_the_trace_too(deps, traced, exporter, png_file, publisher, storage, drive, clock):
    deps.tracing = traced  # `drive` runs the task-mode steps with this Deps
    job = producer.submit_edit(str(png_file), "make it night", settings=deps.settings, publisher=publisher, storage=storage, tracing=traced)
    clock.advance(1)
    drive(job.id)
    [root] = [span for span in exporter.get_finished_spans() if span.name == tracing.ADMIT]
    names = [span.name for span in spans_of_trace(exporter, root.context.trace_id)]
    assert names[0] == tracing.ADMIT and {tracing.SUBMIT, tracing.POLL, tracing.COPY} <= set(names)


def test_tracing_off_stores_no_trace(settings, png_file, publisher, storage, sessions):
    job = producer.submit_edit(str(png_file), "make it night", settings=settings, publisher=publisher, storage=storage)
    assert get_job(sessions, job.id).trace_parent is None
