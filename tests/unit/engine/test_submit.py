"""Specification of the submit step (worker/engine/submit.py) against the in-memory provider, moto
S3 and SQLite, on a fake clock: what a job's one submit sends, records and schedules, how it
answers every provider error, and how it gets its input image (read from S3 at submit time and
sent as base64 or as a presigned URL; an input S3 cannot serve keeps the job queued). Celery is replaced by running the step the previous step returned
(`drive`); a step run twice or out of turn must be a no-op. The first test follows one job through
the whole chain the submit starts (submit, poll, upload)."""

from __future__ import annotations

import base64
import hashlib
import io
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import update

from models import Job
from worker.adapters.limiter import MemoryLimiter
from worker.adapters.storage import split_uri
from worker.core.codes import ErrorCode
from worker.core.jobs import job_events, transition
from worker.core.states import State
from worker.core.steps import Next, Step
from worker.engine import submit
from worker.engine.copier import run_upload
from worker.engine.submit import run_submit

PNG_DATA_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


@pytest.fixture
def batch_deps(deps):
    deps.settings = deps.settings.model_copy(update={"poll_mode": "batch", "poll_batch_size": 50, "poll_threads": 4})
    return deps


# --- the happy path ------------------------------------------------------------------------------


def test_a_job_goes_from_queued_to_succeeded_with_its_output_byte_equal_in_s3(
    deps, new_job, drive, load, sessions, fake_provider, s3, list_keys, clock, states
):
    job_id = new_job(prompt="make the sky purple", size="1024*768", seed=5)
    ran = drive(job_id)
    assert [n.step for n in ran] == ["submit", "poll", "upload"]

    job = load(job_id)
    assert job.state == "succeeded"
    assert states(sessions, job_id) == ["queued", "submitting", "processing", "uploading", "succeeded"]
    [task] = fake_provider.submissions
    assert job.prediction_id == task.id
    assert task.body == {
        "prompt": "make the sky purple",
        "image": "https://images.example.com/cat.png",
        "size": "1024*768",
        "seed": 5,
        "enable_base64_output": False,
        "enable_sync_mode": False,
    }
    key = f"edits/{job_id}/0.png"
    assert job.outputs == [f"s3://edit-worker-unit/{key}"]
    assert list_keys() == [key]
    obj = s3.get_object(Bucket="edit-worker-unit", Key=key)
    assert obj["Body"].read() == fake_provider.output_bytes[(task.id, 0)]
    assert obj["ContentType"] == "image/png"
    assert job.has_nsfw_contents == [False]
    assert job.provider_outputs is None  # copied: the expiring URLs are no longer needed
    assert job.error_code is None and job.finished_at == clock.now()
    assert job.attempts == 1


def test_a_local_image_is_sent_to_the_provider_as_its_data_uri(deps, new_job, fake_provider, submitted):
    job_id = new_job(image=PNG_DATA_URI)
    submitted(deps, job_id)
    assert fake_provider.submissions[0].body["image"] == PNG_DATA_URI


def test_the_prediction_id_is_committed_when_the_job_enters_processing(
    deps, new_job, load, fake_provider, breaker, journal, limiter, clock, submitted
):
    job_id = new_job()
    nxt = submitted(deps, job_id)
    job = load(job_id)
    [task] = fake_provider.submissions
    assert job.state == "processing" and job.prediction_id == task.id
    assert job.attempts == 1 and job.submitted_at == clock.now()
    assert nxt == Next("poll", job_id, countdown=3.0, poll_seq=job.poll_seq)
    assert job.next_poll_at == clock.now() + timedelta(seconds=3)
    # Also journaled, so a crash right after the submit is settled without guessing.
    assert journal.recall(job_id) == task.id


def test_submit_in_batch_mode_wakes_the_poller_instead_of_chaining_a_poll(batch_deps, new_job, load):
    job_id = new_job()
    nxt = submit.run_submit(batch_deps, job_id)
    assert nxt is not None and nxt.step == Step.POLL_DUE
    assert load(job_id).state == "processing"
    # A second job due in the same half second shares that wake-up.
    other = new_job(prompt="another")
    assert submit.run_submit(batch_deps, other) is None


# --- duplicates ----------------------------------------------------------------------------------


def test_a_duplicate_submit_message_after_success_is_a_no_op(deps, new_job, drive, load, fake_provider):
    job_id = new_job()
    drive(job_id)
    assert load(job_id).state == "succeeded"
    assert run_submit(deps, job_id) is None
    assert run_upload(deps, job_id) is None
    assert len(fake_provider.submissions) == 1
    assert fake_provider.calls["submit"] == 1


def test_a_duplicate_submit_message_while_processing_is_a_no_op(deps, new_job, load, fake_provider, submitted):
    job_id = new_job()
    submitted(deps, job_id)
    assert run_submit(deps, job_id) is None
    assert fake_provider.calls["submit"] == 1
    assert load(job_id).attempts == 1


# --- submit errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, code",
    [
        (httpx.Response(500, json={"code": 500, "message": "internal error"}), "500"),
        (httpx.Response(502, text="<html><body>Bad Gateway</body></html>", headers={"content-type": "text/html"}), "502"),
        (httpx.ConnectError("connection refused"), "transient"),
    ],
)
def test_a_transient_submit_error_puts_the_job_back_in_queued_with_a_backoff(
    deps, new_job, load, fake_provider, clock, answer, code, states
):
    fake_provider.script("submit", answer)
    job_id = new_job()
    nxt = run_submit(deps, job_id)
    job = load(job_id)
    assert job.state == "queued"
    assert job.error_code == code
    assert nxt.step == "submit" and nxt.job_id == job_id
    assert job.next_attempt_at == clock.now() + timedelta(seconds=nxt.countdown)
    assert fake_provider.tasks == {}  # the provider created nothing
    assert states(deps.sessions, job_id) == ["queued", "submitting", "queued"]


def test_after_the_backoff_the_job_is_submitted_once(deps, new_job, load, fake_provider, clock, drive):
    fake_provider.script("submit", httpx.Response(500, json={"code": 500, "message": "internal error"}))
    job_id = new_job()
    ran = drive(job_id)
    assert [n.step for n in ran] == ["submit", "submit", "poll", "upload"]
    job = load(job_id)
    assert job.state == "succeeded" and job.attempts == 2 and job.error_code is None
    assert len(fake_provider.submissions) == 1


def test_a_submit_message_that_arrives_before_the_backoff_is_over_does_nothing(deps, new_job, load, fake_provider, clock):
    fake_provider.script("submit", httpx.Response(503, json={"code": 503, "message": "busy"}, headers={"Retry-After": "10"}))
    job_id = new_job()
    first = run_submit(deps, job_id)
    assert first.countdown >= 10
    clock.advance(5)
    assert run_submit(deps, job_id) is None
    assert fake_provider.calls["submit"] == 1
    assert load(job_id).state == "queued"


def test_a_429_submit_honours_retry_after(deps, new_job, load, fake_provider, clock):
    fake_provider.script("submit", httpx.Response(429, json={"code": 429, "message": "too many requests"}, headers={"Retry-After": "30"}))
    job_id = new_job()
    nxt = run_submit(deps, job_id)
    assert nxt.step == "submit" and nxt.countdown >= 30
    job = load(job_id)
    assert job.state == "queued" and job.next_attempt_at >= clock.now() + timedelta(seconds=30)
    clock.advance(10)
    assert run_submit(deps, job_id) is None  # still inside Retry-After: the provider is not asked
    assert fake_provider.calls["submit"] == 1


@pytest.mark.parametrize(
    "answer, code, message",
    [
        (httpx.Response(400, json={"code": 400, "message": "prompt too long"}), "400", "prompt too long"),
        (
            httpx.Response(200, json={"code": 1200, "message": "content moderation refused the image", "data": None}),
            "1200",
            "content moderation refused the image",
        ),
        (httpx.Response(400, json={"code": 1402, "message": "image URL unreachable", "data": None}), "1402", "image URL unreachable"),
    ],
)
def test_a_permanent_submit_error_fails_the_job_with_the_providers_code_and_message(
    deps, new_job, load, fake_provider, answer, code, message
):
    fake_provider.script("submit", answer)
    job_id = new_job()
    assert run_submit(deps, job_id) is None
    job = load(job_id)
    assert job.state == "failed"
    assert job.error_code == code
    assert message in job.error_message
    assert job.finished_at is not None
    assert deps.settings.wavespeed_api_key.get_secret_value() not in job.error_message


def test_a_401_opens_the_breaker_keeps_the_job_queued_and_defers_the_next_submit_without_calling_the_provider(
    deps, new_job, load, fake_provider, breaker, journal, limiter, clock, states
):
    fake_provider.script("submit", httpx.Response(401, json={"code": 401, "message": "invalid api key"}))
    first_job = new_job()
    nxt = run_submit(deps, first_job)
    assert breaker.state()["open"] and breaker.state()["tripped"]
    job = load(first_job)
    assert job.state == "queued" and job.attempts == 1
    assert states(deps.sessions, first_job) == ["queued", "submitting", "queued"]
    assert "credentials" in job_events(deps.sessions, first_job)[-1].reason
    assert nxt == Next("submit", first_job, countdown=60.0)
    assert job.next_attempt_at == clock.now() + timedelta(seconds=60)
    assert fake_provider.calls["submit"] == 1

    # While the breaker is open, other jobs wait in queued and the provider is not called.
    clock.advance(10)
    other = new_job(prompt="another edit")
    deferred = run_submit(deps, other)
    assert fake_provider.calls["submit"] == 1
    assert deferred.step == "submit" and 49 <= deferred.countdown <= 50
    other_row = load(other)
    assert other_row.state == "queued" and other_row.attempts == 0
    assert other_row.next_attempt_at == clock.now() + timedelta(seconds=deferred.countdown)

    # After the open period one probe goes through; its success closes the breaker.
    clock.advance(51)
    assert run_submit(deps, first_job).step == "poll"
    assert fake_provider.calls["submit"] == 2
    assert not breaker.state()["tripped"]
    assert run_submit(deps, other).step == "poll"
    assert len(fake_provider.submissions) == 2


def test_an_unused_breaker_probe_is_handed_back_at_once(deps, new_job, clock, load):
    """A half-open breaker grants one probe; if that job is deferred (here: the concurrency limit),
    the probe must be released, or every submission would wait for it."""
    deps.limiter.max_concurrency = 1
    busy = new_job(prompt="holds the only slot")
    assert deps.limiter.acquire(busy).go
    deps.breaker.trip(5, "test")
    clock.advance(6)  # half-open now
    waiting = new_job(prompt="takes the probe but is deferred")
    nxt = submit.run_submit(deps, waiting)
    assert nxt is not None and nxt.step == Step.SUBMIT and load(waiting).state == "queued"
    deps.limiter.release(busy)
    # The next submission gets the probe straight away instead of waiting ~30 s.
    assert deps.breaker.check().probe


def test_an_ambiguous_submit_stays_in_submitting_and_is_not_resubmitted(deps, new_job, load, fake_provider, sessions, states):
    fake_provider.script("submit", fake_provider.After(httpx.ReadTimeout("read timed out")))
    job_id = new_job()
    assert run_submit(deps, job_id) is None
    job = load(job_id)
    assert job.state == "submitting"
    assert job.error_code == "ambiguous_submit"
    assert job.prediction_id is None
    assert len(fake_provider.tasks) == 1  # the provider did create (and bill) a task
    # A redelivered submit message must not pay a second time.
    assert run_submit(deps, job_id) is None
    assert fake_provider.calls["submit"] == 1
    assert states(sessions, job_id) == ["queued", "submitting"]


def test_over_the_rate_limit_a_job_waits_in_queued_without_spending_an_attempt(deps, new_job, load, fake_provider, clock):
    deps.limiter = MemoryLimiter(rate_per_minute=1, clock=clock.monotonic)
    a, b = new_job(prompt="a"), new_job(prompt="b")
    assert run_submit(deps, a).step == "poll"
    nxt = run_submit(deps, b)
    assert nxt.step == "submit" and 59 <= nxt.countdown <= 60
    assert load(b).state == "queued" and load(b).attempts == 0
    assert fake_provider.calls["submit"] == 1
    clock.advance(nxt.countdown)
    assert run_submit(deps, b).step == "poll"


def test_a_job_cancelled_while_its_submit_is_in_flight_gets_its_provider_task_cancelled(deps, new_job, load, fake_provider, sessions):
    job_id = new_job()

    def operator_cancels(_request):
        with sessions() as s:
            assert transition(s, job_id, State.SUBMITTING, State.CANCELLED, "cancelled by operator", clock=deps.clock)
            s.commit()

    fake_provider.script("submit", operator_cancels)
    assert run_submit(deps, job_id) is None
    job = load(job_id)
    [task] = fake_provider.submissions
    assert job.state == "cancelled"
    assert job.prediction_id == task.id  # still recorded: that task belongs to this job
    assert fake_provider.cancelled == [task.id]


# --- the input image, kept in S3 -------------------------------------------------------------

BUCKET, PREFIX = "edit-worker-unit", "edits"  # as in conftest.py


@pytest.fixture
def png(make_image) -> bytes:
    return make_image("PNG", color=(1, 2, 3))


@pytest.fixture
def stored_job(new_job, png) -> str:
    """A queued job whose input admission stored in S3."""
    return new_job(image="data:image/png;base64," + base64.b64encode(png).decode())


def test_an_input_kept_in_s3_is_read_at_submit_time_and_sent_as_base64(deps, stored_job, png, load, fake_provider):
    row = load(stored_job)
    assert row.image_uri == f"s3://{BUCKET}/{PREFIX}/inputs/sha256-{hashlib.sha256(png).hexdigest()}" and row.image_payload is None

    nxt = run_submit(deps, stored_job)

    assert nxt is not None and nxt.step == Step.POLL
    [task] = fake_provider.submissions
    assert task.body["image"] == "data:image/png;base64," + base64.b64encode(png).decode()


def test_with_presigned_url_delivery_the_provider_gets_a_signed_get_url_of_the_input(deps, stored_job, png, fake_provider):
    deps.settings = deps.settings.model_copy(update={"input_delivery": "presigned_url", "input_url_expiry_seconds": 900})

    assert run_submit(deps, stored_job).step == Step.POLL

    [task] = fake_provider.submissions
    url = urlsplit(task.body["image"])
    assert url.scheme == "https" and url.path.endswith(f"{PREFIX}/inputs/sha256-{hashlib.sha256(png).hexdigest()}")
    query = parse_qs(url.query)
    assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Signature"]


def test_a_public_url_input_is_sent_as_the_url(deps, new_job, fake_provider, list_keys):
    job_id = new_job(image="https://images.example.com/cat.png")
    run_submit(deps, job_id)
    assert fake_provider.submissions[0].body["image"] == "https://images.example.com/cat.png"
    assert list_keys() == []


def test_a_row_from_before_inputs_in_s3_is_submitted_with_its_stored_payload(deps, new_job, sessions, fake_provider):
    legacy = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nold row").decode()
    job_id = new_job()
    with sessions() as session:  # what revision 0003 leaves on an existing row
        session.execute(update(Job).where(Job.id == job_id).values(image_uri=None, image_sha256=None, image_payload=legacy))
        session.commit()

    assert run_submit(deps, job_id).step == Step.POLL
    assert fake_provider.submissions[0].body["image"] == legacy


@pytest.mark.parametrize("delivery", ["base64", "presigned_url"])
def test_s3_down_at_submit_keeps_the_job_queued_and_retries_it_without_sending_or_failing(
    deps, stored_job, png, load, fake_provider, breaker, journal, limiter, down_storage, clock, delivery
):
    deps.settings = deps.settings.model_copy(update={"input_delivery": delivery})
    working = deps.storage
    deps.storage = down_storage

    nxt = run_submit(deps, stored_job)

    assert nxt is not None and nxt.step == Step.SUBMIT and nxt.countdown >= 1.0
    job = load(stored_job)
    assert (job.state, job.attempts, job.error_code) == ("queued", 0, ErrorCode.INPUT_UNAVAILABLE.value)
    assert "super-secret-s3-key" not in job.error_message
    assert job.next_attempt_at > clock.now()
    assert fake_provider.calls["submit"] == 0  # never sent without its image
    assert limiter.slots_held() == 0  # its limiter slot is free for others

    deps.storage = working  # S3 is back
    clock.advance(nxt.countdown)
    assert run_submit(deps, stored_job).step == Step.POLL
    job = load(stored_job)
    assert (job.state, job.attempts, job.error_code) == ("processing", 1, None)
    [task] = fake_provider.submissions
    if delivery == "base64":
        assert task.body["image"] == "data:image/png;base64," + base64.b64encode(png).decode()


def test_an_input_whose_bytes_changed_in_s3_is_not_submitted(deps, stored_job, storage, load, fake_provider, make_image):
    storage.put(split_uri(load(stored_job).image_uri)[1], io.BytesIO(make_image("PNG", color=(9, 9, 9))), "image/png")

    nxt = run_submit(deps, stored_job)

    assert nxt.step == Step.SUBMIT
    job = load(stored_job)
    assert job.state == "queued" and job.error_code == ErrorCode.INPUT_UNAVAILABLE.value and "sha256" in job.error_message
    assert fake_provider.calls["submit"] == 0


def test_an_unused_half_open_probe_is_handed_back_when_the_input_cannot_be_read(
    deps, stored_job, breaker, journal, limiter, down_storage, fake_provider, clock
):
    breaker.trip(1.0, "test outage")
    clock.advance(2)  # the open period is over: half-open, the next submit is the probe
    deps.storage = down_storage

    assert run_submit(deps, stored_job).step == Step.SUBMIT

    assert breaker.check().probe  # the probe is free again for the next submit
    assert fake_provider.calls["submit"] == 0
