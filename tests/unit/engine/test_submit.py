"""Specification of how a submit gets its input image: read from S3 at submit time and sent as
base64 (the default) or as a presigned URL; a public URL as it is; an old row's stored payload. An
input S3 cannot serve keeps the job queued (no attempt spent, never failed, never sent without it)."""

from __future__ import annotations

import base64
import io
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import update

from models import Job
from worker.core.codes import ErrorCode
from worker.core.steps import Step
from worker.engine.submit import run_submit

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
    assert row.image_uri == f"s3://{BUCKET}/{PREFIX}/inputs/{stored_job}" and row.image_payload is None

    nxt = run_submit(deps, stored_job)

    assert nxt is not None and nxt.step == Step.POLL
    [task] = fake_provider.submissions
    assert task.body["image"] == "data:image/png;base64," + base64.b64encode(png).decode()


def test_with_presigned_url_delivery_the_provider_gets_a_signed_get_url_of_the_input(deps, stored_job, fake_provider):
    deps.settings = deps.settings.model_copy(update={"input_delivery": "presigned_url", "input_url_expiry_seconds": 900})

    assert run_submit(deps, stored_job).step == Step.POLL

    [task] = fake_provider.submissions
    url = urlsplit(task.body["image"])
    assert url.scheme == "https" and url.path.endswith(f"{PREFIX}/inputs/{stored_job}")
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
    deps, stored_job, png, load, fake_provider, limits, down_storage, clock, delivery
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
    assert limits._active == set()  # its limiter slot is free for others

    deps.storage = working  # S3 is back
    clock.advance(nxt.countdown)
    assert run_submit(deps, stored_job).step == Step.POLL
    job = load(stored_job)
    assert (job.state, job.attempts, job.error_code) == ("processing", 1, None)
    [task] = fake_provider.submissions
    if delivery == "base64":
        assert task.body["image"] == "data:image/png;base64," + base64.b64encode(png).decode()


def test_an_input_whose_bytes_changed_in_s3_is_not_submitted(deps, stored_job, storage, load, fake_provider, make_image):
    storage.put(f"{PREFIX}/inputs/{stored_job}", io.BytesIO(make_image("PNG", color=(9, 9, 9))), "image/png")

    nxt = run_submit(deps, stored_job)

    assert nxt.step == Step.SUBMIT
    job = load(stored_job)
    assert job.state == "queued" and job.error_code == ErrorCode.INPUT_UNAVAILABLE.value and "sha256" in job.error_message
    assert fake_provider.calls["submit"] == 0


def test_an_unused_half_open_probe_is_handed_back_when_the_input_cannot_be_read(
    deps, stored_job, limits, down_storage, fake_provider, clock
):
    limits.trip_breaker(1.0, "test outage")
    clock.advance(2)  # the open period is over: half-open, the next submit is the probe
    deps.storage = down_storage

    assert run_submit(deps, stored_job).step == Step.SUBMIT

    assert limits.check_breaker().probe  # the probe is free again for the next submit
    assert fake_provider.calls["submit"] == 0
