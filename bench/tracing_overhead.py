"""What a job step pays for tracing: a step's span with tracing off (the default, NoTracing) and on
(the SDK, spans kept in memory: no network), against no span at all. Prints one line per case.

    python bench/tracing_overhead.py [--n 200000]
"""

from __future__ import annotations

import argparse
import timeit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="spans per case")
    n = parser.parse_args().n

    from worker.adapters.tracing import SUBMIT, NoTracing

    off = NoTracing()
    trace_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    def bare() -> None:
        pass

    def with_off() -> None:
        with off.step(SUBMIT, trace_parent, job_id="job-1", tenant="default", attempt=1) as span:
            span.set(outcome="accepted", prediction_id="pred-1")

    cases = [("no span", bare), ("tracing off (NoTracing)", with_off)]
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from worker.adapters.tracing import OtelTracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    on = OtelTracing(provider)

    def with_on() -> None:
        with on.step(SUBMIT, trace_parent, job_id="job-1", tenant="default", attempt=1) as span:
            span.set(outcome="accepted", prediction_id="pred-1")
        exporter.clear()

    cases.append(("tracing on (SDK, in-memory export)", with_on))
    base = None
    for name, fn in cases:
        seconds = min(timeit.repeat(fn, number=n, repeat=3)) / n
        base = seconds if base is None else base
        print(f"{name:38s} {seconds * 1e9:9.0f} ns/step  (+{(seconds - base) * 1e9:.0f} ns over no span)")


if __name__ == "__main__":
    main()
