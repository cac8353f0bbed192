"""Specification of the job pipeline (submit, poll, upload, cancel, retry) against the in-memory
provider, moto S3 and SQLite, on a fake clock. Celery is replaced by running the step the previous
step returned (`drive`); a step run twice or out of turn must be a no-op."""

from __future__ import annotations

import base64
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from models import Outbox
from worker.adapters.limiter import MemoryLimiter
from worker.adapters.storage import Storage
from worker.core.jobs import job_events, transition
from worker.core.states import State
from worker.core.steps import Next
from worker.engine.copier import run_upload
from worker.engine.operator import cancel_job, retry_job
from worker.engine.poller import run_poll
from worker.engine.submit import run_submit
from worker.errors import InvalidJobOperation, StorageError, TransientProviderError

PNG_DATA_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def states(sessions, job_id) -> list[str]:
    return [e.to_state for e in job_events(sessions, job_id)]


def submitted(deps, job_id) -> Next:
    """Run the submit step and check it went through to processing."""
    nxt = run_submit(deps, job_id)
    assert nxt is not None and nxt.step == "poll", nxt
    return nxt


# --- the happy path -------------------------------------------------------------------------


def test_a_job_goes_from_queued_to_succeeded_with_its_output_byte_equal_in_s3(
    deps, new_job, drive, load, sessions, fake_provider, s3, list_keys, clock
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


def test_base64_outputs_are_decoded_and_stored_byte_equal(deps, new_job, drive, load, fake_provider, s3, list_keys):
    job_id = new_job(enable_base64_output=True)
    drive(job_id)
    job = load(job_id)
    assert job.state == "succeeded"
    [task] = fake_provider.submissions
    assert task.body["enable_base64_output"] is True
    assert not task.outputs[0].startswith(("http", "data:"))  # bare base64, as the provider sends it
    assert fake_provider.calls["download"] == 0
    assert list_keys() == [f"edits/{job_id}/0.png"]
    assert s3.get_object(Bucket="edit-worker-unit", Key=f"edits/{job_id}/0.png")["Body"].read() == fake_provider.output_bytes[(task.id, 0)]


def test_every_output_gets_its_own_indexed_key(deps, new_job, drive, load, fake_provider, s3, list_keys):
    fake_provider.outputs_per_task = 3
    job_id = new_job()
    drive(job_id)
    job = load(job_id)
    [task] = fake_provider.submissions
    assert list_keys() == [f"edits/{job_id}/{i}.png" for i in range(3)]
    assert job.outputs == [f"s3://edit-worker-unit/edits/{job_id}/{i}.png" for i in range(3)]
    for i in range(3):
        assert (
            s3.get_object(Bucket="edit-worker-unit", Key=f"edits/{job_id}/{i}.png")["Body"].read()
            == fake_provider.output_bytes[(task.id, i)]
        )


def test_the_stored_type_and_extension_come_from_the_output_bytes(deps, new_job, load, fake_provider, s3, list_keys, make_image):
    job_id = new_job()
    first = submitted(deps, job_id)
    jpeg = make_image("JPEG", size=(16, 16))
    task = fake_provider.finish(load(job_id).prediction_id)
    task.outputs = [base64.b64encode(jpeg).decode()]
    assert run_poll(deps, job_id, first.poll_seq).step == "upload"
    run_upload(deps, job_id)
    key = f"edits/{job_id}/0.jpg"
    assert list_keys() == [key]
    obj = s3.get_object(Bucket="edit-worker-unit", Key=key)
    assert obj["ContentType"] == "image/jpeg" and obj["Body"].read() == jpeg


def test_a_local_image_is_sent_to_the_provider_as_its_data_uri(deps, new_job, fake_provider):
    job_id = new_job(image=PNG_DATA_URI)
    submitted(deps, job_id)
    assert fake_provider.submissions[0].body["image"] == PNG_DATA_URI


def test_the_prediction_id_is_committed_when_the_job_enters_processing(deps, new_job, load, fake_provider, journal, clock):
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


# --- polling --------------------------------------------------------------------------------


def test_a_poll_before_completion_reschedules_at_least_two_seconds_later_and_bumps_poll_seq(deps, new_job, load, fake_provider, clock):
    fake_provider.polls_to_complete = 3
    job_id = new_job()
    first = submitted(deps, job_id)
    clock.advance(first.countdown)
    nxt = run_poll(deps, job_id, first.poll_seq)
    assert nxt.step == "poll"
    assert nxt.countdown >= 2.0
    assert nxt.poll_seq == first.poll_seq + 1
    job = load(job_id)
    assert job.state == "processing" and job.poll_seq == nxt.poll_seq
    assert job.next_poll_at == clock.now() + timedelta(seconds=nxt.countdown)


def test_a_poll_with_a_stale_poll_seq_is_a_no_op(deps, new_job, load, fake_provider, clock):
    fake_provider.polls_to_complete = 5
    job_id = new_job()
    first = submitted(deps, job_id)
    second = run_poll(deps, job_id, first.poll_seq)
    calls = fake_provider.calls["result"]
    assert run_poll(deps, job_id, first.poll_seq) is None  # the old chain dies
    assert fake_provider.calls["result"] == calls  # without asking the provider
    assert load(job_id).poll_seq == second.poll_seq


def test_a_poll_of_a_job_that_is_not_processing_is_a_no_op(deps, new_job, fake_provider):
    job_id = new_job()
    assert run_poll(deps, job_id, 0) is None
    assert run_upload(deps, job_id) is None
    assert fake_provider.calls["result"] == 0


def test_a_transient_poll_error_reschedules_without_failing(deps, new_job, load, fake_provider, clock):
    job_id = new_job()
    first = submitted(deps, job_id)
    fake_provider.script("result", httpx.Response(503, json={"code": 503, "message": "busy"}))
    nxt = run_poll(deps, job_id, first.poll_seq)
    assert nxt.step == "poll" and nxt.countdown >= 2.0 and nxt.poll_seq == first.poll_seq + 1
    assert load(job_id).state == "processing"


def test_a_poll_auth_error_trips_the_breaker_and_keeps_polling_later(deps, new_job, load, fake_provider, breaker):
    job_id = new_job()
    first = submitted(deps, job_id)
    fake_provider.script("result", httpx.Response(401, json={"code": 401, "message": "bad key"}))
    nxt = run_poll(deps, job_id, first.poll_seq)
    assert breaker.state()["open"]
    assert nxt.step == "poll" and nxt.countdown >= deps.settings.breaker_open_seconds
    assert load(job_id).state == "processing"
    # While the breaker is open, polls of other jobs wait too, without calling the provider.
    other = new_job(prompt="other")
    breaker.reset()
    other_first = submitted(deps, other)
    breaker.trip(60, "test")
    calls = fake_provider.calls["result"]
    assert run_poll(deps, other, other_first.poll_seq).countdown >= 60
    assert fake_provider.calls["result"] == calls


def test_a_task_that_failed_at_the_provider_fails_the_job_with_its_error(deps, new_job, drive, load, fake_provider):
    fake_provider.auto_outcome = "failed"
    fake_provider.auto_error = "input image violates the content policy"
    job_id = new_job()
    ran = drive(job_id)
    assert [n.step for n in ran] == ["submit", "poll"]
    job = load(job_id)
    assert job.state == "failed"
    assert job.error_code == "task_failed"
    assert job.error_message == "input image violates the content policy"
    assert job.finished_at is not None


def test_a_completed_task_without_outputs_fails_the_job(deps, new_job, load, fake_provider):
    fake_provider.outputs_per_task = 0
    job_id = new_job()
    first = submitted(deps, job_id)
    assert run_poll(deps, job_id, first.poll_seq) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "no_outputs")


# --- duplicates -----------------------------------------------------------------------------


def test_a_duplicate_submit_message_after_success_is_a_no_op(deps, new_job, drive, load, fake_provider):
    job_id = new_job()
    drive(job_id)
    assert load(job_id).state == "succeeded"
    assert run_submit(deps, job_id) is None
    assert run_upload(deps, job_id) is None
    assert len(fake_provider.submissions) == 1
    assert fake_provider.calls["submit"] == 1


def test_a_duplicate_submit_message_while_processing_is_a_no_op(deps, new_job, load, fake_provider):
    job_id = new_job()
    submitted(deps, job_id)
    assert run_submit(deps, job_id) is None
    assert fake_provider.calls["submit"] == 1
    assert load(job_id).attempts == 1


# --- submit errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, code",
    [
        (httpx.Response(500, json={"code": 500, "message": "internal error"}), "500"),
        (httpx.Response(502, text="<html><body>Bad Gateway</body></html>", headers={"content-type": "text/html"}), "502"),
        (httpx.ConnectError("connection refused"), "transient"),
    ],
)
def test_a_transient_submit_error_puts_the_job_back_in_queued_with_a_backoff(deps, new_job, load, fake_provider, clock, answer, code):
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
    deps, new_job, load, fake_provider, breaker, clock
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


def test_an_ambiguous_submit_stays_in_submitting_and_is_not_resubmitted(deps, new_job, load, fake_provider, sessions):
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
        from worker.core.jobs import transition
        from worker.core.states import State

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


# --- deadlines ------------------------------------------------------------------------------


def test_a_job_whose_deadline_passed_while_queued_fails_without_calling_the_provider(deps, new_job, load, fake_provider, clock):
    job_id = new_job(deadline_seconds=60)
    clock.advance(61)
    assert run_submit(deps, job_id) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert fake_provider.calls["submit"] == 0


def test_a_job_whose_deadline_passed_while_processing_fails_and_its_task_is_cancelled(deps, new_job, load, fake_provider, clock):
    fake_provider.auto_outcome = None  # never finishes
    job_id = new_job(deadline_seconds=60)
    first = submitted(deps, job_id)
    clock.advance(61)
    assert run_poll(deps, job_id, first.poll_seq) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert fake_provider.cancelled == [job.prediction_id]


def test_a_job_whose_deadline_passed_while_uploading_fails_but_keeps_the_provider_outputs(deps, new_job, load, fake_provider, clock):
    job_id = new_job(deadline_seconds=60)
    first = submitted(deps, job_id)
    assert run_poll(deps, job_id, first.poll_seq).step == "upload"
    clock.advance(61)
    assert run_upload(deps, job_id) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert job.provider_outputs  # `retry` can still copy them


# --- upload ---------------------------------------------------------------------------------


class FlakyStorage(Storage):
    """Real S3 (moto) underneath; the puts numbered in `fail_on` raise StorageError instead."""

    def __init__(self, inner: Storage, fail_on: set[int]):
        super().__init__(inner.client, inner.bucket, inner.prefix)
        self.fail_on = fail_on
        self.puts = 0

    def put(self, key, body, content_type):
        self.puts += 1
        if self.puts in self.fail_on:
            raise StorageError(f"put s3://{self.bucket}/{key} failed: S3 unavailable")
        return super().put(key, body, content_type)


def to_upload(deps, job_id) -> None:
    first = submitted(deps, job_id)
    assert run_poll(deps, job_id, first.poll_seq) == Next("upload", job_id)


def test_an_upload_retried_after_a_storage_error_leaves_one_object_per_output(deps, new_job, load, fake_provider, list_keys, s3):
    fake_provider.outputs_per_task = 2
    deps.storage = FlakyStorage(deps.storage, fail_on={2})  # the first output lands, the second fails
    job_id = new_job()
    to_upload(deps, job_id)
    with pytest.raises(StorageError):
        run_upload(deps, job_id)
    assert load(job_id).state == "uploading"  # the task retries; the row has not moved
    assert list_keys() == [f"edits/{job_id}/0.png"]

    assert run_upload(deps, job_id) is None
    job = load(job_id)
    assert job.state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png", f"edits/{job_id}/1.png"]
    [task] = fake_provider.submissions
    for i in range(2):
        assert (
            s3.get_object(Bucket="edit-worker-unit", Key=f"edits/{job_id}/{i}.png")["Body"].read()
            == fake_provider.output_bytes[(task.id, i)]
        )
    assert len(fake_provider.submissions) == 1


def test_a_transient_download_error_leaves_the_job_uploading_for_a_retry(deps, new_job, load, fake_provider, list_keys):
    job_id = new_job()
    to_upload(deps, job_id)
    fake_provider.script("download", httpx.Response(503, text="busy"))
    with pytest.raises(TransientProviderError):
        run_upload(deps, job_id)
    assert load(job_id).state == "uploading"
    assert run_upload(deps, job_id) is None
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png"]


def test_an_expired_output_url_fails_the_job_and_keeps_the_outputs_for_retry(deps, new_job, load, fake_provider, breaker):
    job_id = new_job()
    to_upload(deps, job_id)
    fake_provider.script("download", httpx.Response(403, text="AccessDenied"))
    assert run_upload(deps, job_id) is None
    job = load(job_id)
    assert job.state == "failed" and job.provider_outputs
    assert not breaker.state()["tripped"]  # the API key is fine


def test_output_downloads_carry_no_authorization_header(deps, new_job, drive, fake_provider):
    drive(new_job())
    downloads = fake_provider.requests_to("download")
    assert downloads and all("authorization" not in r.headers for r in downloads)
    assert all("authorization" in r.headers for r in fake_provider.requests_to("submit") + fake_provider.requests_to("result"))


def test_an_output_that_is_neither_a_url_nor_base64_fails_the_job(deps, new_job, load, fake_provider):
    job_id = new_job()
    first = submitted(deps, job_id)
    task = fake_provider.tasks[load(job_id).prediction_id]
    fake_provider.finish(task.id)
    task.outputs = ["%%% not base64 %%%"]
    assert run_poll(deps, job_id, first.poll_seq).step == "upload"
    assert run_upload(deps, job_id) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "bad_output")


# --- cancel ---------------------------------------------------------------------------------


def test_cancelling_a_processing_job_cancels_the_provider_task_and_is_terminal(deps, new_job, load, fake_provider, clock):
    fake_provider.auto_outcome = None
    job_id = new_job()
    first = submitted(deps, job_id)
    job = cancel_job(deps, job_id)
    assert job.state == "cancelled" and job.finished_at == clock.now()
    assert fake_provider.cancelled == [job.prediction_id]
    [delete] = fake_provider.requests_to("cancel")
    assert delete.method == "DELETE" and delete.url.path == f"/api/v3/predictions/{job.prediction_id}"
    # Terminal: later messages are no-ops, and cancelling again changes nothing.
    assert run_poll(deps, job_id, first.poll_seq) is None
    assert cancel_job(deps, job_id).state == "cancelled"
    assert len(fake_provider.cancelled) == 1


def test_cancelling_a_job_whose_submit_answered_but_never_committed_cancels_the_journaled_task(deps, new_job, load, fake_provider):
    fake_provider.auto_outcome = None
    job_id = new_job()
    with deps.sessions() as session:  # the worker moved it to submitting, sent it, journaled the id ...
        transition(session, job_id, State.QUEUED, State.SUBMITTING, "submit attempt 1", clock=deps.clock, attempts=1)
        session.commit()
    task = fake_provider.create_task({"prompt": "make the sky purple"}, via_submit=True)
    deps.journal.remember(job_id, task.id)  # ... and died before its commit
    job = cancel_job(deps, job_id)
    assert job.state == "cancelled" and job.prediction_id == task.id
    assert fake_provider.cancelled == [task.id]


def test_cancelling_a_queued_job_does_not_call_the_provider(deps, new_job, fake_provider):
    job_id = new_job()
    assert cancel_job(deps, job_id).state == "cancelled"
    assert fake_provider.requests == []
    assert run_submit(deps, job_id) is None
    assert fake_provider.calls["submit"] == 0


def test_a_finished_job_cannot_be_cancelled(deps, new_job, drive):
    job_id = new_job()
    drive(job_id)
    with pytest.raises(InvalidJobOperation):
        cancel_job(deps, job_id)


def test_a_provider_error_on_cancel_still_cancels_the_job(deps, new_job, fake_provider):
    fake_provider.auto_outcome = None
    job_id = new_job()
    submitted(deps, job_id)
    fake_provider.script("cancel", httpx.Response(500, json={"code": 500, "message": "oops"}))
    assert cancel_job(deps, job_id).state == "cancelled"


# --- retry (the dead-letter replay) ---------------------------------------------------------


def outbox_steps(sessions, job_id) -> list[str]:
    with sessions() as s:
        return [o.task for o in s.scalars(select(Outbox).where(Outbox.job_id == job_id).order_by(Outbox.id))]


def test_retry_of_a_job_that_failed_at_upload_copies_the_outputs_again_without_resubmitting(
    deps, new_job, load, fake_provider, sessions, list_keys
):
    job_id = new_job()
    to_upload(deps, job_id)
    url = load(job_id).provider_outputs[0]
    fake_provider.missing_outputs.add(url)  # the CDN answers 404 this time
    assert run_upload(deps, job_id) is None
    failed = load(job_id)
    assert failed.state == "failed" and failed.provider_outputs == [url]

    fake_provider.missing_outputs.clear()
    job = retry_job(deps, job_id)
    assert job.state == "uploading"
    assert job.error_code is None and job.finished_at is None
    assert outbox_steps(sessions, job_id) == ["submit", "upload"]
    assert run_upload(deps, job_id) is None
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png"]
    assert len(fake_provider.submissions) == 1


def test_retry_of_a_job_whose_task_failed_submits_again(deps, new_job, drive, load, fake_provider, sessions):
    fake_provider.auto_outcome = "failed"
    job_id = new_job()
    drive(job_id)
    first_prediction = load(job_id).prediction_id
    assert load(job_id).state == "failed"

    job = retry_job(deps, job_id)
    assert job.state == "queued"
    assert job.prediction_id is None
    assert outbox_steps(sessions, job_id) == ["submit", "submit"]

    fake_provider.auto_outcome = "completed"
    drive(job_id)
    job = load(job_id)
    assert job.state == "succeeded" and job.prediction_id != first_prediction
    assert len(fake_provider.submissions) == 2
    assert states(sessions, job_id)[-6:] == ["failed", "queued", "submitting", "processing", "uploading", "succeeded"]


def test_retry_of_a_job_that_ran_out_of_time_while_processing_polls_the_same_task_again(
    deps, new_job, load, fake_provider, clock, sessions
):
    fake_provider.auto_outcome = None
    job_id = new_job(deadline_seconds=60)
    first = submitted(deps, job_id)
    clock.advance(61)
    run_poll(deps, job_id, first.poll_seq)
    failed = load(job_id)
    assert failed.error_code == "deadline_exceeded"

    job = retry_job(deps, job_id)
    assert job.state == "processing" and job.prediction_id == failed.prediction_id
    assert job.poll_seq == failed.poll_seq + 1
    assert job.deadline_at > clock.now()
    assert outbox_steps(sessions, job_id)[-1] == "poll"
    assert len(fake_provider.submissions) == 1


@pytest.mark.parametrize("finish", ["queued", "succeeded", "cancelled"])
def test_only_failed_jobs_can_be_retried(deps, new_job, drive, finish):
    job_id = new_job()
    if finish == "succeeded":
        drive(job_id)
    elif finish == "cancelled":
        cancel_job(deps, job_id)
    with pytest.raises(InvalidJobOperation):
        retry_job(deps, job_id)
