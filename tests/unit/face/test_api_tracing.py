"""POST /jobs starts the new job's trace: a `job.admit` span whose traceparent the row keeps; an
idempotent replay starts none."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker.adapters import tracing
from worker.adapters.tracing import OtelTracing
from worker.api import create_app
from worker.core import tenants
from worker.core.jobs import get_job


def test_post_jobs_starts_the_jobs_trace_and_a_replay_starts_none(settings, sessions, deps, publisher, make_image):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings, deps_factory=lambda: deps, publisher=publisher, storage=deps.storage, tracing=OtelTracing(provider))
    key = tenants.create_key(sessions, "default", admin=True).key.get_secret_value()
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    image = "data:image/png;base64," + base64.b64encode(make_image()).decode()
    request = {"image": image, "prompt": "make the sky purple", "idempotency_key": "order-1"}

    first = client.post("/jobs", json=request)
    assert first.status_code == 201
    assert client.post("/jobs", json=request).status_code == 200  # the replay: same job, no new trace

    [admit] = exporter.get_finished_spans()
    job_id = first.json()["id"]
    assert admit.name == tracing.ADMIT and admit.parent is None
    assert dict(admit.attributes) == {"job.id": job_id, "tenant": "default", "outcome": "created"}
    assert get_job(sessions, job_id).trace_parent.split("-")[1] == f"{admit.context.trace_id:032x}"
