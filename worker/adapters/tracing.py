"""OpenTelemetry tracing: one trace per job, its W3C traceparent kept on the job's row so every
process that takes a step of the job continues it. Off (`NoTracing`) unless an endpoint is set.

Off means off: `NoTracing` imports nothing from OpenTelemetry and its spans are one shared no-op
object, so the hot path pays a method call. On, `OtelTracing` wraps an SDK TracerProvider (tests
give it one with an InMemorySpanExporter; `from_settings` one exporting over OTLP/HTTP).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from worker.config import Settings

# Span names: one per step of a job's life.
ADMIT = "job.admit"
SUBMIT = "job.submit"
POLL = "job.poll"
COPY = "job.copy"
CALLBACK = "job.callback"

# Keyword names (Python identifiers) -> span attribute names.
_ATTRIBUTES = {
    "job_id": "job.id",
    "prediction_id": "prediction.id",
    "tenant": "tenant",
    "attempt": "attempt",
    "outcome": "outcome",
    "http_status_code": "http.response.status_code",
}


def _attributes(values: dict[str, Any]) -> dict[str, Any]:
    return {_ATTRIBUTES.get(name, name.replace("_", ".")): value for name, value in values.items() if value is not None}


class Span(Protocol):
    """What a step may do with its span: add attributes (`outcome=`, `prediction_id=`) and record
    an error that did not propagate (one that propagates out of the `with` is recorded anyway)."""

    def set(self, **attributes: Any) -> None: ...

    def error(self, exc: BaseException) -> None: ...


class AdmitSpan(Span, Protocol):
    trace_parent: str | None  # the W3C traceparent to store on the job's row

    def end(self) -> None: ...


class Tracing(Protocol):
    enabled: bool

    def admit(self, job_id: str, tenant: str) -> AdmitSpan:
        """Start a job's trace (its root span, `job.admit`); the caller ends it."""
        ...

    def step(self, name: str, trace_parent: str | None, **attributes: Any) -> Any:
        """A context manager: a span named `name`, child of the job's stored `trace_parent`,
        yielding a `Span`. An exception leaving it is recorded and re-raised."""
        ...

    def trace_id(self, trace_parent: str | None) -> str | None:
        """The trace id (32 hex) in a traceparent, for log lines; None when off or unknown."""
        ...


class _NullSpan:
    __slots__ = ()
    trace_parent: str | None = None

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, **attributes: Any) -> None:
        pass

    def error(self, exc: BaseException) -> None:
        pass

    def end(self) -> None:
        pass


_NULL = _NullSpan()


class NoTracing:
    """Tracing off: every span is the same no-op object; no OpenTelemetry module is imported."""

    enabled = False

    def admit(self, job_id: str, tenant: str) -> _NullSpan:
        return _NULL

    def step(self, name: str, trace_parent: str | None, **attributes: Any) -> _NullSpan:
        return _NULL

    def trace_id(self, trace_parent: str | None) -> str | None:
        return None


class _OtelSpan:
    __slots__ = ("_span", "trace_parent")

    def __init__(self, span: Any, trace_parent: str | None = None) -> None:
        self._span = span
        self.trace_parent = trace_parent

    def set(self, **attributes: Any) -> None:
        self._span.set_attributes(_attributes(attributes))

    def error(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.record_exception(exc)
        self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}"))

    def end(self) -> None:
        self._span.end()


class OtelTracing:
    """Tracing on, over an OpenTelemetry TracerProvider (the SDK's, or any that implements the API)."""

    enabled = True

    def __init__(self, provider: Any) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer("edit-worker")
        self._propagator = TraceContextTextMapPropagator()

    def admit(self, job_id: str, tenant: str) -> _OtelSpan:
        from opentelemetry.context import Context
        from opentelemetry.trace import set_span_in_context

        # A fresh Context: each job is its own trace, even when many are admitted in one call.
        span = self._tracer.start_span(ADMIT, context=Context(), attributes=_attributes({"job_id": job_id, "tenant": tenant}))
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span, Context()))
        return _OtelSpan(span, carrier.get("traceparent"))

    @contextmanager
    def step(self, name: str, trace_parent: str | None, **attributes: Any) -> Iterator[_OtelSpan]:
        from opentelemetry.context import Context

        parent = self._propagator.extract({"traceparent": trace_parent}) if trace_parent else Context()
        with self._tracer.start_as_current_span(name, context=parent, attributes=_attributes(attributes)) as span:
            yield _OtelSpan(span)

    def trace_id(self, trace_parent: str | None) -> str | None:
        # traceparent = version "-" trace-id (32 hex) "-" parent-id "-" flags
        if not trace_parent or len(trace_parent) < 35:
            return None
        return trace_parent[3:35]

    def shutdown(self) -> None:
        self.provider.shutdown()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for an endpoint given as a base URL (OTEL_EXPORTER_OTLP_ENDPOINT's
    meaning): `/v1/traces` appended unless it is there already."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def from_settings(settings: Settings) -> Tracing:
    """NoTracing unless `settings.otlp_endpoint` is set; then an SDK provider exporting in batches
    over OTLP/HTTP, its resource naming this process (service.instance.id, process.pid)."""
    if not settings.otlp_endpoint:
        return NoTracing()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {"service.name": settings.service_name, "service.instance.id": str(uuid.uuid4()), "process.pid": os.getpid()}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint))))
    return OtelTracing(provider)


_lock = threading.Lock()
_shared: dict[tuple[int, str | None, str], Tracing] = {}


def shared_tracing(settings: Settings) -> Tracing:
    """One Tracing per process and configuration (a forked child gets its own: the key holds the
    pid), for the producer, the API and `build_deps`."""
    key = (os.getpid(), settings.otlp_endpoint, settings.service_name)
    tracing = _shared.get(key)
    if tracing is None:
        with _lock:
            tracing = _shared.get(key)
            if tracing is None:
                tracing = _shared[key] = from_settings(settings)
    return tracing


def flush() -> None:
    """Export what this process's tracers still hold (a worker child about to exit)."""
    for key, tracing in list(_shared.items()):
        if key[0] == os.getpid() and isinstance(tracing, OtelTracing):
            tracing.provider.force_flush()
