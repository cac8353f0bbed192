"""Tracing end to end: jobs admitted here run through real worker processes that export their spans
over OTLP/HTTP to a tiny receiver on 127.0.0.1 (decoded with opentelemetry-proto's classes). One
job's trace holds its admission, submit, poll(s), copy and callback spans, each a child of the
admission span, from more than one process; and the workers' JSON log lines name that trace."""

from __future__ import annotations

import gzip
import json
import os
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from worker.adapters import tracing
from worker.devtools import local

pytestmark = pytest.mark.integration

OTLP_PORT = local.free_port()
HOOK_PORT = local.free_port()


def _value(any_value):
    return getattr(any_value, any_value.WhichOneof("value"))


class Collector:
    """An OTLP/HTTP traces endpoint (protobuf) that keeps every span with its resource's attributes."""

    def __init__(self, port: int):
        self.port = port
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.keep(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def keep(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                                "instance": resource.get("service.instance.id"),
                                "pid": resource.get("process.pid"),
                                "service": resource.get("service.name"),
                            }
                        )

    def of_job(self, job_id: str) -> list[dict]:
        with self.lock:
            return [span for span in self.spans if span["attributes"].get("job.id") == job_id]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Hook:
    """A producer's callback endpoint that accepts everything."""

    def __init__(self, port: int):
        self.count = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(hook_self):
                hook_self.rfile.read(int(hook_self.headers.get("content-length", 0)))
                self.count += 1
                hook_self.send_response(204)
                hook_self.end_headers()

            def log_message(self, *args):
                pass

        self.url = f"http://127.0.0.1:{port}/hooks/edits"
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


STEPS = {tracing.ADMIT, tracing.SUBMIT, tracing.POLL, tracing.COPY, tracing.CALLBACK}


@pytest.mark.timeout(150)
@pytest.mark.worker_env(
    EDIT_WORKER_OTLP_ENDPOINT=f"http://127.0.0.1:{OTLP_PORT}",
    EDIT_WORKER_SERVICE_NAME="edit-worker-it",
    OTEL_BSP_SCHEDULE_DELAY="200",  # the SDK's batch export interval, in ms: spans arrive quickly
    EDIT_WORKER_LOG_FORMAT="json",
    EDIT_WORKER_CALLBACK_SECRET="whsec_aW50ZWdyYXRpb24tdHJhY2luZy1rZXktMzJieXRlcw==",
    EDIT_WORKER_ALLOW_PRIVATE_URLS="true",
)
def test_one_jobs_trace_spans_admission_submit_polls_copy_and_callback_across_processes(cluster, sample_image):
    collector, hook = Collector(OTLP_PORT), Hook(HOOK_PORT)
    try:
        cluster.start_worker("w1", concurrency=2)
        cluster.start_worker("w2", concurrency=2)
        cluster.start_beat()
        jobs = [cluster.submit(str(sample_image), f"traced edit {i}", size="512*512", callback_url=hook.url) for i in range(3)]
        tracing.flush()  # this process (the producer) exports its admission spans now
        cluster.wait_all_terminal(3, timeout=90)
        assert {job.state for job in cluster.jobs()} == {"succeeded"}, cluster.logs()

        def complete(job_id: str) -> bool:
            return {span["name"] for span in collector.of_job(job_id)} >= STEPS

        for job in jobs:
            cluster.wait_until(lambda job=job: complete(job.id), 30, f"every step of {job.id} exported")

        for job in jobs:
            spans = collector.of_job(job.id)
            [admit] = [span for span in spans if span["name"] == tracing.ADMIT]
            assert {span["trace_id"] for span in spans} == {admit["trace_id"]}, spans
            assert admit["parent"] == "" and admit["pid"] == os.getpid()
            assert all(span["parent"] == admit["span_id"] for span in spans if span is not admit)
            # Steps ran in worker processes, not here: at least two processes wrote this trace.
            assert len({span["instance"] for span in spans}) >= 2
            assert {span["pid"] for span in spans if span is not admit} - {os.getpid()}
            assert {span["service"] for span in spans} == {"edit-worker-it"}
            by_name = defaultdict(list)
            for span in spans:
                by_name[span["name"]].append(span)
            assert by_name[tracing.SUBMIT][-1]["attributes"]["outcome"] == "accepted"
            prediction_id = by_name[tracing.SUBMIT][-1]["attributes"]["prediction.id"]
            assert by_name[tracing.POLL][-1]["attributes"] == {
                "job.id": job.id,
                "tenant": "default",
                "prediction.id": prediction_id,
                "outcome": "completed",
            }
            assert by_name[tracing.COPY][-1]["attributes"]["outcome"] == "stored"
            assert by_name[tracing.CALLBACK][-1]["attributes"]["outcome"] == "delivered"
        assert len({collector.of_job(job.id)[0]["trace_id"] for job in jobs}) == 3  # a trace per job

        # The workers' log lines about a job are JSON objects naming its trace.
        traces = {job.id: collector.of_job(job.id)[0]["trace_id"] for job in jobs}
        about_jobs = []
        for line in cluster.all_logs().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("job_id") in traces:
                    about_jobs.append(entry)
        assert about_jobs, cluster.logs()
        assert all(entry["trace_id"] == traces[entry["job_id"]] and entry["tenant"] == "default" for entry in about_jobs)
        assert "sandbox-key" not in cluster.all_logs()  # the provider key, never logged
    finally:
        collector.stop()
        hook.stop()
