"""A hostile provider on real parts: the sandbox's hostile mode answers a share of submits, result
polls and output downloads with proxy HTML pages, a gateway's JSON, garbage and truncated JSON,
answers for another (or a malformed) task id, endless and slow-drip bodies, redirects to private
addresses and in loops, and pages that are not images — while real workers and the beat run.

Every job must end correctly (here: succeeded, since no hostile answer is definitive), nothing
internal is ever fetched (a local "internal" server that the redirects point to counts its hits),
no job is lost, each is paid once, and each output in S3 is byte-equal to the provider's.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker.devtools.sandbox import HOSTILE_KINDS

pytestmark = pytest.mark.integration

JOBS = 16
HOSTILE_RATE = 0.4


class Internal:
    """A stand-in for an internal service (cloud metadata, an admin port) on 127.0.0.1."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                hits.append(f"{self.command} {self.path}")
                body = b'{"AccessKeyId": "internal-secret"}'
                self.send_response(200)
                self.send_header("content-type", "image/png")  # as tempting as it gets
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_HEAD = do_PUT = _any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/latest/meta-data/iam/security-credentials/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Internal:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(240)
@pytest.mark.worker_env(
    EDIT_WORKER_MAX_OUTPUT_BYTES=str(1024 * 1024),
    EDIT_WORKER_DOWNLOAD_TIMEOUT="3",
    EDIT_WORKER_AMBIGUOUS_SKEW_SECONDS="2",
    EDIT_WORKER_AMBIGUOUS_LIST_GRACE_SECONDS="2",
)
def test_every_job_ends_correctly_against_a_hostile_provider_and_nothing_internal_is_fetched(cluster, sample_image):
    with Internal() as internal:
        cluster.sandbox_config(hostile_rate=HOSTILE_RATE, hostile_kinds="", internal_url=internal.url)
        try:
            workers = [cluster.start_worker(f"w{i + 1}", concurrency=2) for i in range(2)]
            cluster.start_beat()
            for worker in workers:
                cluster.wait_for_log(worker, " ready.", timeout=60)
            for i in range(JOBS):
                cluster.submit(str(sample_image), f"hostile provider #{i}", size="512*512", seed=i)
            done = cluster.wait_all_terminal(JOBS, timeout=150)
        finally:
            hostile = cluster.sandbox_stats()["hostile"]
            cluster.sandbox_config(hostile_rate=0.0)  # the checks below read the honest outputs
        print(f"hostile answers: {sum(hostile.values())} {hostile}; internal hits: {len(internal.hits)}")

        assert internal.hits == [], f"internal service fetched: {internal.hits}"
        assert len(done) == JOBS, "a job was lost"
        wrong = [(j.prompt, j.state, j.error_code, j.error_message) for j in done if j.state != "succeeded"]
        assert not wrong, f"no hostile answer is definitive, yet: {wrong}\n{cluster.logs()}"
        for job in done:
            cluster.assert_outputs_byte_equal(job)
        cluster.assert_one_submission_per_job(done)

        # The run met the hostile provider for real: private redirects and most other kinds.
        assert hostile.get("download:redirect_private", 0) >= 1, hostile
        kinds_met = {name.split(":", 1)[1] for name in hostile}
        all_kinds = {kind for kinds in HOSTILE_KINDS.values() for kind in kinds}
        assert len(kinds_met) >= len(all_kinds) - 3, (sorted(all_kinds - kinds_met), hostile)
        logs = cluster.all_logs()
        assert "output URL refused" in logs


@pytest.mark.timeout(180)
@pytest.mark.worker_env(EDIT_WORKER_AMBIGUOUS_SKEW_SECONDS="2", EDIT_WORKER_AMBIGUOUS_LIST_GRACE_SECONDS="2")
def test_a_submit_answered_with_another_jobs_prediction_id_is_settled_by_the_reconciler(cluster, sample_image):
    """The provider bills a new task but answers with an id another job already holds. The worker
    must not take it (nor crash on the unique id), must not resubmit blindly: the reconciler finds
    the job's real task in the provider's list and adopts it. One at a time, so the list decides."""
    cluster.start_worker("w1", concurrency=2)
    cluster.start_beat()
    cluster.submit(str(sample_image), "duplicate id #0", size="512*512", seed=0)
    cluster.wait_all_terminal(1, timeout=60)
    cluster.sandbox_config(hostile_rate=1.0, hostile_kinds="duplicate_id")
    try:
        cluster.submit(str(sample_image), "duplicate id #1", size="512*512", seed=1)
        cluster.wait_until(lambda: cluster.sandbox_stats()["hostile"].get("submit:duplicate_id"), 30, "a duplicate-id answer")
    finally:
        cluster.sandbox_config(hostile_rate=0.0, hostile_kinds="")
    done = cluster.wait_all_terminal(2, timeout=90)
    assert [j.state for j in done] == ["succeeded", "succeeded"], [(j.prompt, j.state, j.error_code) for j in done]
    stats = cluster.sandbox_stats()
    for job in done:
        cluster.assert_outputs_byte_equal(job)
        [task] = [t for t in stats["tasks"] if t["id"] == job.prediction_id]
        assert task["prompt"] == job.prompt  # each job holds its own task
    cluster.assert_one_submission_per_job(done)
    assert "ambiguous submit, left for the reconciler" in cluster.all_logs()
