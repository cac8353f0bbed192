"""Callbacks end to end: real workers deliver every finished job's signed callback to a real HTTP
receiver on 127.0.0.1 that first answers 500, then hangs past the timeout, then is down (a closed
port) while a worker is SIGKILLed and replaced, and then comes back. Every delivery arrives at least
once with a valid Standard Webhooks signature; none is lost; duplicates carry the same webhook-id
and the same body."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks
from sqlalchemy import select, update

from models import CallbackDelivery, Job
from worker.devtools import local

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"integration-callback-key-32bytes").decode()
TERMINAL = ("succeeded", "failed", "cancelled")


class Receiver:
    """A producer's callback endpoint: a threaded HTTP server that answers each request with the next
    scripted action (an HTTP status, or "hang": answer only after the sender's timeout), then 204;
    it verifies and records everything it receives. stop() closes the port; start() reopens it."""

    def __init__(self, port: int, script: list):
        self.port = port
        self.script = list(script)
        self.received: list[dict] = []
        self.invalid: list[str] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.verifier = standardwebhooks.Webhook(SECRET)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/edits"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    try:
                        receiver.verifier.verify(body, headers)
                        receiver.received.append({"id": headers["webhook-id"], "body": body})
                    except standardwebhooks.WebhookVerificationError as exc:
                        receiver.invalid.append(str(exc))
                    action = receiver.script.pop(0) if receiver.script else 204
                if action == "hang":
                    time.sleep(2.5)  # past EDIT_WORKER_CALLBACK_TIMEOUT: the sender gives up first
                    action = 200
                self.send_response(action)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def ids(self) -> set[str]:
        with self.lock:
            return {r["id"] for r in self.received}


def deliveries(cluster) -> list[CallbackDelivery]:
    with cluster.sessions()() as session:
        return list(session.scalars(select(CallbackDelivery).order_by(CallbackDelivery.id)))


def submit_with_callback(cluster, image, prompt: str, url: str) -> str:
    job = cluster.submit(str(image), prompt, size="512*512")
    # The producer API takes no callback_url yet (the HTTP API will): set it before the job ends.
    with cluster.sessions()() as session:
        session.execute(update(Job).where(Job.id == job.id).values(callback_url=url))
        session.commit()
    return job.id


@pytest.mark.timeout(150)
@pytest.mark.worker_env(
    EDIT_WORKER_CALLBACK_SECRET=SECRET,
    EDIT_WORKER_ALLOW_PRIVATE_URLS="true",
    EDIT_WORKER_CALLBACK_TIMEOUT="1",
    EDIT_WORKER_CALLBACK_BACKOFF_BASE="0.5",
    EDIT_WORKER_CALLBACK_BACKOFF_MAX="2",
    EDIT_WORKER_CALLBACK_RETRY_SECONDS="300",
)
def test_every_callback_arrives_signed_through_errors_timeouts_an_outage_and_a_worker_crash(cluster, sample_image):
    receiver = Receiver(local.free_port(), [500, 500, 503, "hang", "hang"])
    receiver.start()
    cluster.sandbox_config(fail_rate=0.3)
    worker = cluster.start_worker("w1", concurrency=3)
    cluster.start_beat()

    # Phase 1: the receiver errs, then hangs, then answers.
    first = [submit_with_callback(cluster, sample_image, f"callback edit {i}", receiver.url) for i in range(6)]
    cluster.cli("cancel", first[0])
    cluster.wait_all_terminal(len(first), timeout=60)
    cluster.wait_until(lambda: {d.status for d in deliveries(cluster)} == {"delivered"} and len(deliveries(cluster)) == 6, 45, "phase 1")
    assert len(receiver.received) >= 6 + 3  # the three error answers were retried

    # Phase 2: the receiver is down (closed port) while jobs finish and a worker is SIGKILLed.
    receiver.stop()
    second = [submit_with_callback(cluster, sample_image, f"callback edit {i}", receiver.url) for i in range(6, 10)]
    cluster.wait_all_terminal(len(first) + len(second), timeout=60)
    cluster.wait_until(lambda: all(d.attempts >= 2 for d in deliveries(cluster) if d.job_id in second), 30, "failed tries while down")
    worker.kill()
    cluster.start_worker("w2", concurrency=3)
    time.sleep(3)  # still down for a while with the new worker retrying
    assert all(d.status == "pending" for d in deliveries(cluster) if d.job_id in second)
    receiver.start()
    cluster.wait_until(lambda: {d.status for d in deliveries(cluster)} == {"delivered"} and len(deliveries(cluster)) == 10, 45, "phase 2")

    rows = deliveries(cluster)
    assert receiver.invalid == []  # every request carried a valid signature
    assert {d.webhook_id for d in rows} <= receiver.ids()  # none lost
    assert len(rows) == 10 and len({d.job_id for d in rows}) == 10  # one per terminal job
    with cluster.sessions()() as session:
        states = {job.id: job.state for job in session.scalars(select(Job))}
    by_id: dict[str, set[bytes]] = {}
    for r in receiver.received:
        by_id.setdefault(r["id"], set()).add(r["body"])
    for d in rows:
        [body] = by_id[d.webhook_id]  # duplicates (after a hang) carry the same id and the same body
        sent = json.loads(body)
        assert (sent["id"], sent["state"]) == (d.job_id, d.state) and d.state == states[d.job_id] and d.state in TERMINAL
    assert states[first[0]] == "cancelled"
    assert any(len([r for r in receiver.received if r["id"] == d.webhook_id]) > 1 for d in rows)  # retries happened
