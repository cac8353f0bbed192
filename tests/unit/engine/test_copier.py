"""Specification of the copy to S3 (worker/engine/copier.py): every output, URL or base64, lands
byte-equal under its own indexed key with the type its bytes say; a storage or download error
leaves the job uploading for a retry (one object per output in the end); an expired or unreadable
output fails the job and keeps the provider's outputs for `retry`."""

from __future__ import annotations

import base64

import httpx
import pytest

from worker.adapters.storage import Storage
from worker.engine.copier import run_upload
from worker.engine.poller import run_poll
from worker.errors import StorageError, TransientProviderError

# --- what lands in S3 ----------------------------------------------------------------------------


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


def test_the_stored_type_and_extension_come_from_the_output_bytes(deps, new_job, load, fake_provider, s3, list_keys, make_image, submitted):
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


def test_output_downloads_carry_no_authorization_header(deps, new_job, drive, fake_provider):
    drive(new_job())
    downloads = fake_provider.requests_to("download")
    assert downloads and all("authorization" not in r.headers for r in downloads)
    assert all("authorization" in r.headers for r in fake_provider.requests_to("submit") + fake_provider.requests_to("result"))


# --- errors --------------------------------------------------------------------------------------


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


def test_an_upload_retried_after_a_storage_error_leaves_one_object_per_output(deps, new_job, load, fake_provider, list_keys, s3, to_upload):
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


def test_a_transient_download_error_leaves_the_job_uploading_for_a_retry(deps, new_job, load, fake_provider, list_keys, to_upload):
    job_id = new_job()
    to_upload(deps, job_id)
    fake_provider.script("download", httpx.Response(503, text="busy"))
    with pytest.raises(TransientProviderError):
        run_upload(deps, job_id)
    assert load(job_id).state == "uploading"
    assert run_upload(deps, job_id) is None
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png"]


def test_an_output_that_is_neither_a_url_nor_base64_fails_the_job(deps, new_job, load, fake_provider, submitted):
    job_id = new_job()
    first = submitted(deps, job_id)
    task = fake_provider.tasks[load(job_id).prediction_id]
    fake_provider.finish(task.id)
    task.outputs = ["%%% not base64 %%%"]
    assert run_poll(deps, job_id, first.poll_seq).step == "upload"
    assert run_upload(deps, job_id) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "bad_output")
