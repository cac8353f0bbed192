"""Specification of S3 storage: the deterministic key scheme, typed puts that overwrite, content
sniffing, and StorageError for every way S3 can be unavailable. S3 is moto, in process."""

from __future__ import annotations

import io

import boto3
import pytest
from botocore.config import Config

from worker.adapters.storage import Storage, extension_for, sniff_content_type, split_uri
from worker.errors import StorageError

JOB = "7d9f1c2e-0000-4000-8000-000000000001"


def test_keys_are_prefix_job_id_index_and_extension(storage):
    assert storage.key_for(JOB, 0, "png") == f"edits/{JOB}/0.png"
    assert storage.key_for(JOB, 3, "jpg") == f"edits/{JOB}/3.jpg"


def test_keys_without_a_prefix_start_with_the_job_id(s3):
    assert Storage(s3, "b", "").key_for(JOB, 1, "webp") == f"{JOB}/1.webp"
    assert Storage(s3, "b", "/nested/prefix/").key_for(JOB, 0, "png") == f"nested/prefix/{JOB}/0.png"


def test_put_stores_the_bytes_with_their_content_type(storage, s3, make_image, list_keys):
    data = make_image("PNG")
    key = storage.key_for(JOB, 0, "png")
    uri = storage.put(key, io.BytesIO(data), "image/png")
    assert uri == f"s3://edit-worker-unit/{key}"
    assert list_keys() == [key]
    obj = s3.get_object(Bucket="edit-worker-unit", Key=key)
    assert obj["Body"].read() == data
    assert obj["ContentType"] == "image/png"
    assert storage.get_bytes(key) == data
    assert storage.head(key)["ContentType"] == "image/png"


def test_a_second_put_to_the_same_key_overwrites_and_leaves_one_object(storage, make_image, list_keys):
    key = storage.key_for(JOB, 0, "png")
    storage.put(key, io.BytesIO(make_image("PNG", color=(1, 1, 1))), "image/png")
    second = make_image("PNG", color=(2, 2, 2))
    storage.put(key, io.BytesIO(second), "image/png")
    assert list_keys() == [key]
    assert storage.get_bytes(key) == second


def test_put_rewinds_the_body_first(storage, make_image):
    data = make_image("PNG")
    body = io.BytesIO(data)
    body.read()  # e.g. a retried put after the first attempt consumed it
    key = storage.key_for(JOB, 0, "png")
    storage.put(key, body, "image/png")
    assert storage.get_bytes(key) == data


@pytest.mark.parametrize("fmt, mime, ext", [("PNG", "image/png", "png"), ("JPEG", "image/jpeg", "jpg"), ("WEBP", "image/webp", "webp")])
def test_sniff_content_type_recognises_png_jpeg_and_webp(make_image, fmt, mime, ext):
    head = make_image(fmt)[:16]
    assert sniff_content_type(head) == mime
    # The bytes win over what the server declared.
    assert sniff_content_type(head, "application/octet-stream") == mime
    assert extension_for(mime) == ext


def test_sniff_content_type_falls_back_to_a_known_declared_type_only():
    assert sniff_content_type(b"????????", "image/webp") == "image/webp"
    assert sniff_content_type(b"????????", "text/html") == "application/octet-stream"
    assert sniff_content_type(b"") == "application/octet-stream"
    assert extension_for("application/octet-stream") == "bin"


def test_split_uri():
    assert split_uri("s3://bucket/a/b/0.png") == ("bucket", "a/b/0.png")
    with pytest.raises(ValueError):
        split_uri("https://bucket/a")


def test_put_into_a_missing_bucket_raises_storage_error(s3):
    storage = Storage(s3, "no-such-bucket", "edits")
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.put(storage.key_for(JOB, 0, "png"), io.BytesIO(b"data"), "image/png")


def test_reading_a_missing_object_raises_storage_error(storage):
    with pytest.raises(StorageError):
        storage.get_bytes("edits/nothing/0.png")
    with pytest.raises(StorageError):
        storage.head("edits/nothing/0.png")


def test_ensure_bucket_creates_a_missing_bucket_and_is_idempotent(s3):
    storage = Storage(s3, "fresh-bucket", "")
    storage.ensure_bucket()
    storage.ensure_bucket()
    assert "fresh-bucket" in [b["Name"] for b in s3.list_buckets()["Buckets"]]


@pytest.fixture(scope="module")
def unreachable() -> Storage:
    # Port 9 (discard) refuses connections; one attempt keeps the test fast.
    client = boto3.session.Session().client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="AKIAUNITTEST",
        aws_secret_access_key="super-secret-s3-key",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1, read_timeout=1, s3={"addressing_style": "path"}),
    )
    return Storage(client, "bucket", "edits")


def test_put_to_an_unreachable_endpoint_raises_storage_error(unreachable):
    with pytest.raises(StorageError, match="failed") as info:
        unreachable.put(unreachable.key_for(JOB, 0, "png"), io.BytesIO(b"data"), "image/png")
    assert "super-secret-s3-key" not in str(info.value)


def test_reading_from_an_unreachable_endpoint_raises_storage_error(unreachable):
    with pytest.raises(StorageError):
        unreachable.get_bytes(unreachable.key_for(JOB, 0, "png"))


def test_ensure_bucket_on_an_unreachable_endpoint_raises_storage_error(unreachable):
    with pytest.raises(StorageError, match="cannot reach"):
        unreachable.ensure_bucket()


def test_a_jobs_input_is_stored_at_prefix_inputs_job_id_with_its_content_type(storage, s3, make_image):
    data = make_image("JPEG")
    uri = storage.put_input(JOB, data, "image/jpeg")
    assert uri == f"s3://edit-worker-unit/edits/inputs/{JOB}"
    assert storage.get(f"edits/inputs/{JOB}") == (data, "image/jpeg")
    assert Storage(s3, "b", "").input_key(JOB) == f"inputs/{JOB}"


def test_list_keys_under_a_jobs_output_prefix_never_includes_another_job(storage, list_keys):
    other = JOB[:-1] + "2"
    for job_id in (JOB, JOB + "0", other):
        storage.put(storage.key_for(job_id, 0, "png"), io.BytesIO(b"x"), "image/png")
    assert storage.output_prefix(JOB) == f"edits/{JOB}/"
    assert storage.list_keys(storage.output_prefix(JOB)) == [f"edits/{JOB}/0.png"]


def test_delete_removes_the_objects_by_uri_and_counts_missing_ones_as_deleted(storage, list_keys):
    keep = storage.put(storage.key_for(JOB, 1, "png"), io.BytesIO(b"keep"), "image/png")
    gone = [storage.put(storage.key_for(JOB, 0, "png"), io.BytesIO(b"x"), "image/png"), storage.put_input(JOB, b"in", "image/png")]
    assert storage.delete([*gone, gone[0], "s3://edit-worker-unit/edits/never-there"]) == 3
    assert list_keys() == [split_uri(keep)[1]]


def test_delete_on_an_unreachable_endpoint_raises_storage_error(unreachable):
    with pytest.raises(StorageError, match="delete"):
        unreachable.delete([f"s3://bucket/edits/inputs/{JOB}"])


def test_presigned_urls_are_signed_with_sigv4(storage):
    storage.put_input(JOB, b"in", "image/png")
    url = storage.presign(storage.input_key(JOB), expires=600)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=600" in url


class CountingS3:
    """The real (moto) client, counting the calls admission makes."""

    def __init__(self, client):
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if name in ("head_object", "put_object"):
            self.calls.append(name)
        return attr


def test_input_content_is_stored_once_under_its_digest_and_the_same_bytes_are_not_sent_again(s3, make_image, list_keys):
    import hashlib

    data = make_image("PNG")
    digest = hashlib.sha256(data).hexdigest()
    counting = CountingS3(s3)
    first, second = Storage(counting, "edit-worker-unit", "edits"), Storage(counting, "edit-worker-unit", "edits")

    uri = first.put_input_content(digest, data, "image/png")
    assert uri == f"s3://edit-worker-unit/edits/inputs/sha256-{digest}"
    assert first.get(f"edits/inputs/sha256-{digest}") == (data, "image/png")
    assert counting.calls == ["head_object", "put_object"]
    assert first.put_input_content(digest, data, "image/png") == uri  # this process stored it: no call
    assert counting.calls == ["head_object", "put_object"]
    assert second.put_input_content(digest, data, "image/png") == uri  # another process: a HEAD, no upload
    assert counting.calls == ["head_object", "put_object", "head_object"]
    assert [k for k in list_keys() if "/inputs/" in k] == [f"edits/inputs/sha256-{digest}"]


def test_input_content_on_an_unreachable_endpoint_raises_storage_error(unreachable):
    with pytest.raises(StorageError, match="head"):
        unreachable.put_input_content("0" * 64, b"in", "image/png")
