"""Fault tests on real parts: SIGKILLed workers at every step, Redis / PostgreSQL / S3 / the provider
going away mid-run, injected 429 / 5xx / HTML / timeouts / failed downloads, revoked credentials
and permanent task failures.

Every test ends with the same three checks: every job is terminal (succeeded, unless the scenario
makes failure the right answer), every succeeded job's outputs are byte-equal in S3, and the
provider counted exactly one submission per job — nothing lost, nothing paid twice.
"""

from __future__ import annotations

import json
import time

import pytest

from worker.adapters.redis_keys import RedisKeys
from worker.devtools import local

pytestmark = pytest.mark.integration

# The ambiguous-submit window is http_timeout (5 s) + skew on both sides, then a listing grace:
# with these a job left in `submitting` is settled ~9 s after its row last changed (the submit's
# start after a crash; the client timeout, 5 s later, after a slow answer).
FAST_AMBIGUITY = dict(EDIT_WORKER_AMBIGUOUS_SKEW_SECONDS="2", EDIT_WORKER_AMBIGUOUS_LIST_GRACE_SECONDS="2")
TERMINAL = ("succeeded", "failed", "cancelled")
BREAKER_TRIPPED = RedisKeys().breaker_tripped


# --- helpers ------------------------------------------------------------------------------------


def submit_jobs(cluster, image, n: int, tag: str, start: int = 0):
    return [cluster.submit(str(image), f"{tag} #{i}", size="512*512", seed=i) for i in range(start, start + n)]


def start_ready_worker(cluster, name: str, **env):
    worker = cluster.start_worker(name, concurrency=2, **env)
    cluster.wait_for_log(worker, " ready.", timeout=60)
    return worker


def start_fleet(cluster, workers: int = 2, beat: bool = True):
    """`workers` workers (concurrency 2 each) and the beat, started together; returns once all
    workers are consuming, so the first jobs are spread over them."""
    started = [cluster.start_worker(f"w{i + 1}", concurrency=2) for i in range(workers)]
    if beat:
        cluster.start_beat()
    for worker in started:
        cluster.wait_for_log(worker, " ready.", timeout=60)
    return started


def with_prediction(cluster) -> int:
    return sum(1 for j in cluster.jobs() if j.prediction_id)


def describe(cluster, only_unfinished: bool = True) -> str:
    """Each (unfinished) job with its error and its audit trail, for failure messages."""
    lines = []
    for job in cluster.jobs():
        if only_unfinished and job.state in TERMINAL:
            continue
        lines.append(
            f"{job.id} {job.prompt!r} {job.state} attempts={job.attempts} prediction={job.prediction_id} "
            f"error={job.error_code}: {job.error_message}"
        )
        lines.extend(f"    {src} -> {dst}: {reason}" for src, dst, reason in cluster.events(job.id))
    return "\n".join(lines)


def wait_terminal(cluster, n: int, timeout: float):
    try:
        return cluster.wait_all_terminal(n, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{describe(cluster)}\n{exc}") from None


def finish_all_succeeded(cluster, n: int, timeout: float = 90.0):
    """The suite's end check: all n jobs succeeded, outputs byte-equal in S3, one submission each."""
    done = wait_terminal(cluster, n, timeout)
    assert len(done) == n
    bad = [(j.id, j.prompt, j.state, j.error_code, j.error_message) for j in done if j.state != "succeeded"]
    assert not bad, f"jobs not succeeded: {bad}\n{cluster.logs()}"
    for job in done:
        cluster.assert_outputs_byte_equal(job)
    cluster.assert_one_submission_per_job(done)
    return done


def task_id_for_prompt(cluster, prompt: str) -> str:
    ids = [t["id"] for t in cluster.sandbox_stats()["tasks"] if t["prompt"] == prompt]
    assert len(ids) == 1, (prompt, ids)
    return ids[0]


def provider_calls(stats: dict) -> int:
    return stats["submit_requests"] + stats["result_requests"] + stats["list_requests"] + stats["cancels"]


# --- 1. SIGKILL at each crash point -------------------------------------------------------------

CRASH_POINTS = ["before_submit", "after_submit", "after_journal", "mid_poll", "mid_download", "mid_upload"]
# mid_poll in both poll modes: "batch" (the default: a poll_due task claims every due job under a
# 30 s lease, so its death delays them by the lease) and "task" (one chained message per job).
CRASH_CASES = [pytest.param(point, None, id=point) for point in CRASH_POINTS] + [pytest.param("mid_poll", "task", id="mid_poll-task_mode")]


@pytest.mark.worker_env(**FAST_AMBIGUITY)
@pytest.mark.parametrize("point,poll_mode", CRASH_CASES)
def test_sigkill_at_crash_point(cluster, sample_image, tmp_path, point, poll_mode):
    """A pool process SIGKILLs itself at `point` (once); a second worker and the beat are running.
    Every job succeeds with exactly one provider submission.

    The design's promise for a job left in `submitting` without a prediction id: the reconciler
    adopts the journaled task (after_journal), or — with no journal — lists the provider's tasks in
    the submit's time window: none unclaimed -> provably not created -> resubmit (before_submit);
    exactly one unclaimed and no competing unresolved submit -> adopt it (after_submit). Only one
    job crashes here, so the listing is decidable and no operator is needed."""
    if poll_mode:
        cluster.env["EDIT_WORKER_POLL_MODE"] = poll_mode
    marker = tmp_path / f"crashed-at-{point}"
    crashy = start_ready_worker(cluster, "crashy", EDIT_WORKER_CRASHPOINT=f"{point}:{marker}")
    cluster.start_worker("steady", concurrency=2)
    cluster.start_beat()
    n = 6
    jobs = submit_jobs(cluster, sample_image, n, f"crash at {point}")

    cluster.wait_until(marker.exists, 60, f"a worker process to reach {point} and die")
    done = finish_all_succeeded(cluster, n, timeout=90)

    assert "SIGKILL" in crashy.log_tail(10**7), "the crashy worker's pool process was not killed"
    logs = cluster.all_logs()
    by_id = {j.id: j for j in done}
    if point == "before_submit":
        # The provider was never called for the crashed attempt: proven by the listing, resubmitted once.
        resubmitted = [j for j in jobs if any("provider has no task" in reason for _, _, reason in cluster.events(j.id))]
        assert len(resubmitted) == 1, [cluster.events(j.id) for j in jobs]
        assert by_id[resubmitted[0].id].attempts == 2
    elif point == "after_submit":
        assert "the only unclaimed provider task in the submit's time window" in logs
        assert all(j.attempts == 1 for j in done)
    elif point == "after_journal":
        assert "journaled by the submitting worker" in logs
        assert all(j.attempts == 1 for j in done)
    else:
        assert all(j.attempts == 1 for j in done)


# --- 2. SIGKILL of a whole worker -----------------------------------------------------------------


def all_at_provider(cluster, n: int) -> bool:
    jobs = cluster.jobs()
    return len(jobs) == n and all(j.prediction_id for j in jobs) and not all(j.state in TERMINAL for j in jobs)


@pytest.mark.worker_env(**FAST_AMBIGUITY)
def test_whole_worker_sigkilled_mid_flight_then_replaced(cluster, sample_image):
    """The only worker (main process and pool) is SIGKILLed while its jobs are at the provider and it
    holds their ETA'd poll messages; more jobs arrive while no worker runs. Redis keeps unacked
    messages for its visibility timeout (30 min), so the sweep must re-drive every job from its row
    once a new worker is up.

    The kill is timed outside the submit burst: several submits killed between the provider's
    answer and the commit are, by design, undecidable (see the concurrent slow-submit test)."""
    cluster.sandbox_config(latency=3.0)
    first = start_ready_worker(cluster, "first")
    cluster.start_beat()
    submit_jobs(cluster, sample_image, 6, "worker killed")
    cluster.wait_until(lambda: all_at_provider(cluster, 6), 30, "every job at the provider")

    first.kill()
    assert not first.running
    assert "processing" in cluster.states()
    submit_jobs(cluster, sample_image, 2, "worker killed", start=6)

    cluster.start_worker("second", concurrency=2)
    finish_all_succeeded(cluster, 8, timeout=90)


# --- 3. Redis killed and restarted empty ----------------------------------------------------------


@pytest.mark.worker_env(**FAST_AMBIGUITY)
def test_redis_killed_and_restarted_empty(cluster, sample_image, stack):
    """Redis (broker, limiter, breaker, journal) dies with jobs at the provider and comes back
    empty: every message, every ETA'd poll is gone. Jobs submitted while it is down wait in the
    outbox. No job is lost, none is paid twice."""
    cluster.sandbox_config(latency=3.0)
    start_fleet(cluster)
    submit_jobs(cluster, sample_image, 6, "redis restart")
    cluster.wait_until(lambda: all_at_provider(cluster, 6), 30, "every job at the provider")

    cluster.redis().set("fault-test:sentinel", "1")
    try:
        stack.redis.kill()
        assert not stack.redis.running
        # The producer keeps accepting jobs: rows and outbox rows are written, publishing fails.
        submit_jobs(cluster, sample_image, 2, "redis restart", start=6)
        time.sleep(2)
    finally:
        stack.redis.start()
    assert not cluster.redis().exists("fault-test:sentinel"), "redis did not come back empty"

    finish_all_succeeded(cluster, 8, timeout=90)


@pytest.mark.worker_env(**FAST_AMBIGUITY)
def test_redis_lost_while_submits_are_in_flight_needs_no_operator(cluster, sample_image, stack):
    """DESIGN: "When the provider, Redis, S3 or the DB comes back, every job finishes without
    operator action." Redis dies while four submits are at the provider (answers take 3 s, well
    inside the 5 s client timeout, so none of them is ambiguous by itself).

    Guarded by: `worker_cancel_long_running_tasks_on_connection_loss=False` (a submit cut off by the
    broker's loss would be billed but unrecorded), and run_submit committing the prediction id
    before any limiter bookkeeping in Redis (which is down)."""
    cluster.sandbox_config(slow_submit_rate=1.0, slow_submit_seconds=3.0)
    start_fleet(cluster)
    n = 4
    submit_jobs(cluster, sample_image, n, "redis lost mid-submit")
    cluster.wait_until(lambda: cluster.sandbox_stats()["submissions"] == n, 20, "every submit at the provider")
    try:
        stack.redis.kill()
        time.sleep(4)  # the provider's answers arrive while Redis is still down
    finally:
        stack.redis.start()
    cluster.sandbox_config(slow_submit_rate=0.0)

    def settled():
        jobs = cluster.jobs()
        parked = [j for j in jobs if j.error_code == "ambiguous_submit_needs_operator"]
        return parked or all(j.state in TERMINAL for j in jobs)

    cluster.wait_until(settled, 60, "the jobs to finish or be left for an operator")
    parked = [j.prompt for j in cluster.jobs() if j.error_code == "ambiguous_submit_needs_operator"]
    assert not parked, f"left for an operator after Redis came back: {parked}"
    finish_all_succeeded(cluster, n, timeout=60)


# --- 4. PostgreSQL stopped and started -----------------------------------------------------------


def test_postgres_stopped_and_started_mid_run(cluster, sample_image, stack):
    if stack.postgres is None:
        pytest.skip("PostgreSQL is external (EDIT_WORKER_TEST_DATABASE_URL); cannot stop it")
    cluster.sandbox_config(latency=2.0)
    start_fleet(cluster)
    n = 8
    submit_jobs(cluster, sample_image, n, "postgres restart")
    cluster.wait_until(lambda: with_prediction(cluster) >= 2, 30, "two jobs at the provider")

    try:
        stack.postgres.stop(timeout=30)  # a fast shutdown: sessions are cut, as on a failover
        assert not stack.postgres.running
        time.sleep(4)
    finally:
        if not stack.postgres.running:
            stack.postgres.start()
        local.wait_for_database(stack.pg_admin_url)

    finish_all_succeeded(cluster, n, timeout=120)
    assert "OperationalError" in cluster.all_logs(), "the outage did not reach the workers"


# --- 5. S3 stopped and started -------------------------------------------------------------------


@pytest.mark.persistent_s3
def test_s3_stopped_and_started_while_uploading(cluster, sample_image):
    """The S3 server (rclone over a directory: objects survive) dies while outputs are being copied
    and comes back on the same port; uploads retry and every output lands byte-equal."""
    s3 = cluster.s3_service
    # Input images live in S3 too: with S3 down, jobs not yet submitted wait in `queued` (their
    # input cannot be read). Slow predictions, and three at the provider before S3 dies, make
    # sure outputs are being copied while it is down.
    cluster.sandbox_config(latency=4.0)
    start_fleet(cluster)
    n = 8
    submit_jobs(cluster, sample_image, n, "s3 restart")
    cluster.wait_until(lambda: with_prediction(cluster) >= 3, 30, "three jobs at the provider")

    try:
        s3.kill()
        cluster.wait_until(lambda: cluster.states().get("uploading", 0) >= 3, 30, "uploads stuck while S3 is down")
        assert "succeeded" not in cluster.states()
        time.sleep(6)  # longer than boto's own retries (3 attempts): the upload steps must fail and retry
    finally:
        s3.start()

    finish_all_succeeded(cluster, n, timeout=120)
    assert "StorageError" in cluster.all_logs()


# --- 6. Provider outage ---------------------------------------------------------------------------


@pytest.mark.worker_env(EDIT_WORKER_OUTAGE_OPEN_SECONDS="5")
def test_provider_outage_opens_the_breaker_and_every_job_finishes(cluster, sample_image):
    """Every provider endpoint answers 503 HTML for 30 s, with jobs at the provider and jobs
    arriving meanwhile. The shared breaker opens, calls during the outage stay few, and when the
    provider is back every job finishes without operator action, with one submission each."""
    outage_seconds = 30.0
    cluster.sandbox_config(latency=3.0)
    start_fleet(cluster)
    submit_jobs(cluster, sample_image, 4, "outage")
    cluster.wait_until(lambda: with_prediction(cluster) >= 4, 30, "the first jobs at the provider")

    r = cluster.redis()
    before = cluster.sandbox_stats()
    cluster.sandbox_config(outage=True)
    began = time.monotonic()
    submit_jobs(cluster, sample_image, 4, "outage", start=4)
    tripped_seen = False
    while time.monotonic() - began < outage_seconds:
        tripped_seen = tripped_seen or bool(r.exists(BREAKER_TRIPPED))
        time.sleep(0.25)
    states_during = cluster.states()
    cluster.sandbox_config(outage=False)
    after = cluster.sandbox_stats()

    calls = provider_calls(after) - provider_calls(before)
    print(f"provider calls during the outage: {calls}; downloads: {after['downloads'] - before['downloads']}")
    n = 8
    assert after["submissions"] == before["submissions"] == 4
    assert "failed" not in states_during, states_during
    assert tripped_seen, "the circuit breaker never opened during the outage"
    assert "provider outage: circuit breaker open" in cluster.all_logs()
    # Without a breaker: ~2 s polls for 4 jobs plus submit retries (≤ 4 s backoff) for 4 more ≈ 90 calls.
    assert calls <= 40, f"{calls} provider calls during a {outage_seconds:.0f}s outage (jobs={n})"

    finish_all_succeeded(cluster, n, timeout=90)


class _FailingProvider:
    """A provider whose submit answers 503 (no task created)."""

    def submit(self, request, webhook=None):
        from worker.errors import TransientProviderError

        raise TransientProviderError("POST submit: HTML error page (HTTP 503)", status_code=503)


def test_half_open_probe_is_not_orphaned_by_a_concurrent_retrip(cluster, sample_image):
    """Seen in the outage test: after the provider came back, every submit logged "circuit breaker
    half-open: waiting for the probe submission" for ~30 s, with no probe in flight (fixed).

    The race, replayed deterministically with separate RedisBreakers on the real Redis: worker B's
    `check` reads the breaker's TTL (expired: half-open); worker A's probe fails at that
    moment and re-trips the breaker (deleting the probe key); B then SETs the probe key NX — and gets
    it, although the breaker is open again. B submits, the provider answers 503, `record_failure`
    sees the breaker already open so neither trips nor deletes the probe, and run_submit's
    transient path does not hand the probe back. When the breaker re-closes to half-open, the
    orphaned probe key (px=30000) makes every worker wait for a probe that never reports.

    Guarded by: run_submit hands the probe back whenever its submit ends without success."""
    from worker.adapters.breaker import RedisBreaker
    from worker.adapters.database import session_factory
    from worker.adapters.fleet import RedisFleet
    from worker.adapters.journal import RedisJournal
    from worker.adapters.limiter import RedisLimiter
    from worker.adapters.redis_client import connect
    from worker.adapters.storage import Storage
    from worker.core.steps import RecordingPublisher
    from worker.engine import submit
    from worker.engine.deps import Deps

    url = cluster.env["CELERY_BROKER_URL"]
    a, b, c = (RedisBreaker(connect(url)) for _ in range(3))
    [job] = submit_jobs(cluster, sample_image, 1, "probe race")  # no worker runs: only this test submits it

    a.trip(0.3, "provider unavailable")
    time.sleep(0.4)  # half-open
    real_pttl = b.r.pttl
    state = {"retripped": False}

    def pttl_then_a_retrips(key):
        ttl = real_pttl(key)
        if key == b.k_breaker and not state["retripped"]:
            state["retripped"] = True
            a.trip(1.0, "provider unavailable: the probe failed")  # A's probe failed meanwhile
        return ttl

    b.r.pttl = pttl_then_a_retrips
    deps = Deps(
        settings=cluster.settings,
        sessions=session_factory(cluster.settings.database_url),
        provider=_FailingProvider(),
        storage=Storage.from_settings(cluster.settings),
        limiter=RedisLimiter(b.r, rate_per_minute=1000, max_concurrency=1000),
        breaker=b,
        journal=RedisJournal(b.r),
        fleet=RedisFleet(b.r),
        publisher=RecordingPublisher(),
    )
    submit.run_submit(deps, job.id)
    assert state["retripped"]
    b.r.pttl = real_pttl

    time.sleep(1.2)  # A's re-trip has expired: half-open again, and no probe is in flight
    gate = c.check()
    assert gate.go, f"no probe in flight, yet submissions wait: {gate.reason!r}"


# --- 7. Injected transient faults -----------------------------------------------------------------

INJECTED = {
    "submit-429": dict(submit_error_rate=0.5, submit_error_status=429),
    "submit-500": dict(submit_error_rate=0.5, submit_error_status=500),
    "submit-502-html": dict(submit_error_rate=0.5, submit_error_status=502),
    "result-500": dict(result_error_rate=0.5),
    "download-503": dict(download_fail_rate=0.5),
}


@pytest.mark.parametrize("fault", list(INJECTED))
def test_injected_transient_faults(cluster, sample_image, fault):
    cluster.sandbox_config(**INJECTED[fault])
    start_fleet(cluster)
    n = 8
    submit_jobs(cluster, sample_image, n, f"injected {fault}")
    done = wait_terminal(cluster, n, 90)
    stats = cluster.sandbox_stats()  # before the byte-equal check, which downloads again
    cluster.sandbox_config(**{k: 0.0 for k in INJECTED[fault] if k.endswith("_rate")})

    finish_all_succeeded(cluster, n)
    # The fault really happened (else the test proves nothing).
    if fault.startswith("submit-"):
        assert stats["submit_requests"] > stats["submissions"] == n, stats
        assert any(j.attempts > 1 for j in done)
    elif fault == "result-500":
        assert "injected internal error" in cluster.all_logs()  # the provider's message, logged by the poller
    else:
        assert stats["downloads"] > n, stats


# --- 7b. Slow submits (client timeout after the task was created) ---------------------------------


@pytest.mark.worker_env(**FAST_AMBIGUITY)
def test_slow_submits_are_adopted_never_resubmitted(cluster, sample_image):
    """Submits that create the task but answer after the client's 5 s timeout are ambiguous. One at
    a time (no other unresolved submit in the window), the reconciler finds the single unclaimed
    provider task and adopts it: one submission per job, none resubmitted."""
    start_fleet(cluster)
    plan = [True, False, False, None, True, False]  # slow, fast, fast, (pause), slow, fast
    submitted = 0
    slow_prompts = []
    for slow in plan:
        if slow is None:
            time.sleep(8.5)  # past the first slow submit's window (5 s timeout + 2 s skew)
            continue
        cluster.sandbox_config(slow_submit_rate=1.0 if slow else 0.0, slow_submit_seconds=8.0)
        [job] = submit_jobs(cluster, sample_image, 1, "slow submit", start=submitted)
        submitted += 1
        if slow:
            slow_prompts.append(job.prompt)
        # The sandbox decides at arrival; only change the config once this task exists.
        cluster.wait_until(lambda: cluster.sandbox_stats()["submissions"] == submitted, 20, "the submit to arrive")
    cluster.sandbox_config(slow_submit_rate=0.0)

    done = finish_all_succeeded(cluster, submitted, timeout=60)
    logs = cluster.all_logs()
    assert logs.count("ambiguous submit, left for the reconciler") == 2
    assert logs.count("the only unclaimed provider task in the submit's time window") == 2
    assert all(j.attempts == 1 for j in done)
    assert {j.prompt for j in done if j.state == "succeeded"} >= set(slow_prompts)


@pytest.mark.worker_env(**FAST_AMBIGUITY)
def test_concurrent_slow_submits_wait_for_the_operator(cluster, sample_image):
    """Several ambiguous submits in the same window: the provider's list carries no prompt, so which
    task is whose cannot be proven. The design leaves them for an operator (never a blind
    resubmit, never a guess); `edit-worker resolve JOB --adopt ID` then finishes them, and the
    last one is settled by the reconciler once it is the only one left in its window."""
    cluster.sandbox_config(slow_submit_rate=1.0, slow_submit_seconds=8.0)
    start_fleet(cluster)
    n = 3
    jobs = submit_jobs(cluster, sample_image, n, "concurrent slow submit")
    cluster.wait_until(lambda: cluster.sandbox_stats()["submissions"] == n, 20, "every submit to arrive")
    cluster.sandbox_config(slow_submit_rate=0.0)

    def all_parked():
        current = cluster.jobs()
        return all(j.state == "submitting" and j.error_code == "ambiguous_submit_needs_operator" for j in current) and current

    parked = cluster.wait_until(all_parked, 40, "every ambiguous submit to be left for the operator")
    assert len(parked) == n
    time.sleep(2)  # more sweeps: still parked, nothing resubmitted
    assert all(j.state == "submitting" for j in cluster.jobs())
    assert cluster.sandbox_stats()["submissions"] == n

    # The operator answers for all but the last; each answer makes the reconciler look at the
    # other parked jobs again, and with one job and one unclaimed task left it settles that one.
    for job in jobs[:-1]:
        prediction = task_id_for_prompt(cluster, job.prompt)
        out = cluster.cli("resolve", job.id, "--adopt", prediction).stdout
        assert "adopted" in out, out
    last = next(j for j in cluster.jobs() if j.id == jobs[-1].id)
    assert last.state != "submitting" and last.prediction_id == task_id_for_prompt(cluster, last.prompt), cluster.states()

    done = finish_all_succeeded(cluster, n, timeout=60)
    assert all(j.prediction_id == task_id_for_prompt(cluster, j.prompt) for j in done)


# --- 8. Revoked credentials -----------------------------------------------------------------------


def test_auth_failure_keeps_jobs_queued_until_the_key_works(cluster, sample_image):
    cluster.sandbox_config(auth_failure=True)
    start_fleet(cluster)
    n = 6
    submit_jobs(cluster, sample_image, n, "auth failure")
    r = cluster.redis()
    cluster.wait_until(lambda: r.exists(BREAKER_TRIPPED), 30, "the breaker to open on 401")
    time.sleep(7)  # two more breaker periods (3 s) with one probe each

    jobs = cluster.jobs()
    assert len(jobs) == n
    assert all(j.state in ("queued", "submitting") for j in jobs), cluster.states()
    assert sum(j.state == "queued" for j in jobs) >= n - 1, cluster.states()
    assert r.exists(BREAKER_TRIPPED)
    stats = cluster.sandbox_stats()
    assert stats["submissions"] == 0
    # Paused, not retrying: the first wave (≤ one per pool slot) plus about one probe per period.
    assert stats["submit_requests"] <= 4 + 8, stats
    assert "provider refused the credentials" in cluster.all_logs()

    cluster.sandbox_config(auth_failure=False)
    finish_all_succeeded(cluster, n, timeout=60)
    assert not r.exists(BREAKER_TRIPPED)


# --- 9. Permanent task failure --------------------------------------------------------------------


def test_permanent_failure_is_failed_with_the_providers_message_and_not_resubmitted(cluster, sample_image):
    cluster.sandbox_config(fail_rate=1.0)
    start_fleet(cluster, workers=1)
    n = 6
    submit_jobs(cluster, sample_image, n, "permanent failure")
    done = wait_terminal(cluster, n, 60)
    assert [j.state for j in done] == ["failed"] * n
    for job in done:
        assert job.error_code == "task_failed", (job.error_code, job.error_message)
        assert job.error_message and "sandbox: injected task failure" in job.error_message
        assert job.attempts == 1 and job.prediction_id
    time.sleep(3)  # a few sweeps later: still failed, nothing resubmitted
    assert all(j.state == "failed" for j in cluster.jobs())
    cluster.assert_one_submission_per_job(done)
    status = json.loads(cluster.cli("status", done[0].id, "--json").stdout)
    assert status["error"]["code"] == "task_failed"
