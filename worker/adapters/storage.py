"""S3-compatible storage (boto3): deterministic keys, typed puts, reads, deletes, presigned URLs.

Outputs are `{prefix}/{job_id}/{index}.{ext}` and a job's input image is `{prefix}/inputs/{job_id}`:
a re-run of an upload overwrites, never duplicates.
"""

from __future__ import annotations

import io
import logging
import time
from typing import IO, Any

import boto3
import botocore
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.config import Settings
from worker.errors import StorageError

log = logging.getLogger(__name__)

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
MAGIC = [(b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif")]


def sniff_content_type(head: bytes, declared: str | None = None) -> str:
    """The output's real type from its first bytes; the declared header only as a fallback."""
    for magic, mime in MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return declared if declared in EXTENSIONS else "application/octet-stream"


def extension_for(content_type: str) -> str:
    return EXTENSIONS.get(content_type, "bin")


def make_s3_client(settings: Settings) -> Any:
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        # Path-style addressing works on every S3-compatible server (moto, MinIO, SeaweedFS…).
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
        max_pool_connections=50,
        # CRC checksums only where an operation requires them: S3-compatible servers differ in
        # their support, and computing one per PUT is CPU the upload path does not need (the
        # bytes are compared end to end by the tests).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # SigV4 for presigned input URLs too (botocore may presign with SigV2 otherwise, which
        # newer AWS regions refuse).
        signature_version="s3v4",
        # A fixed User-Agent: botocore otherwise rebuilds and sanitizes its composite one on every
        # request (twice), about 5% of a worker's CPU in the benchmark's profile.
        user_agent=f"edit-worker botocore/{botocore.__version__}",
    )
    secret = settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=secret,
        config=config,
    )


# How long a content-addressed input this process stored (or found) is taken to be there without
# asking S3 again. Short: `prune --with-objects` may delete an input once no job uses it.
KNOWN_INPUT_SECONDS = 60.0


class Storage:
    def __init__(self, client: Any, bucket: str, prefix: str = ""):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Content-addressed inputs this process stored or saw recently (key -> monotonic time):
        # a producer sending the same image again skips even the HEAD for a while.
        self._known_inputs: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings, client: Any | None = None) -> Storage:
        return cls(client or make_s3_client(settings), settings.s3_bucket, settings.s3_prefix)

    def key_for(self, job_id: str, index: int, ext: str) -> str:
        name = f"{job_id}/{index}.{ext}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def input_key(self, job_id: str) -> str:
        name = f"inputs/{job_id}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def output_prefix(self, job_id: str) -> str:
        """The folder of a job's outputs (with the trailing slash, so job ids never overlap)."""
        return self.key_for(job_id, 0, "x").rsplit("/", 1)[0] + "/"

    def put_input(self, job_id: str, data: bytes, content_type: str) -> str:
        """Store a new job's input image (admission); its s3:// URI."""
        return self.put(self.input_key(job_id), io.BytesIO(data), content_type)

    def input_content_key(self, digest: str) -> str:
        """Where input bytes with this sha256 live: `{prefix}/inputs/sha256-<hex>` (one object per
        distinct image, shared by every job that uses it)."""
        return self.input_key(f"sha256-{digest}")

    def put_input_content(self, digest: str, data: bytes, content_type: str) -> str:
        """Store input bytes content-addressed (admission): HEAD first and skip the upload when
        the object is already there with this length — the key names the content, so it can only
        hold these bytes (the submit step checks the digest again before use). Its s3:// URI."""
        key = self.input_content_key(digest)
        seen = self._known_inputs.get(key)
        if seen is not None and time.monotonic() - seen < KNOWN_INPUT_SECONDS:
            return self.uri(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            if head.get("ContentLength") == len(data):
                self._remember_input(key)
                return self.uri(key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"head {self.uri(key)} failed: {_describe(exc)}") from None
        except BotoCoreError as exc:
            raise StorageError(f"head {self.uri(key)} failed: {_describe(exc)}") from None
        try:
            # One PutObject: s3transfer's managed upload costs more than it saves for an image.
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"put {self.uri(key)} failed: {_describe(exc)}") from None
        except Exception as exc:
            raise StorageError(f"put {self.uri(key)} failed: {_describe(exc)}") from None
        self._remember_input(key)
        return self.uri(key)

    def _remember_input(self, key: str) -> None:
        if len(self._known_inputs) >= 4096:
            self._known_inputs.clear()
        self._known_inputs[key] = time.monotonic()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"cannot reach bucket {self.bucket!r}: {_describe(exc)}") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot reach S3: {_describe(exc)}") from None
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"cannot create bucket {self.bucket!r}: {_describe(exc)}") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot reach S3: {_describe(exc)}") from None

    def put(self, key: str, body: IO[bytes], content_type: str) -> str:
        """Upload a seekable file object (rewound first, so a retried put sends the same bytes)."""
        body.seek(0)
        try:
            # One PutObject, not the managed transfer (upload_fileobj): that starts a transfer
            # manager with its own threads and futures per call, several times the CPU of the
            # request itself. One PUT takes up to 5 GB; outputs are capped by max_output_bytes.
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"put {self.uri(key)} failed: {_describe(exc)}") from None
        except Exception as exc:  # a connection dropped while sending the body (urllib3's types)
            raise StorageError(f"put {self.uri(key)} failed: {_describe(exc)}") from None
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        return self.get(key)[0]

    def get(self, key: str) -> tuple[bytes, str | None]:
        """An object's bytes and its stored content type."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), response.get("ContentType")
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"get {self.uri(key)} failed: {_describe(exc)}") from None
        except Exception as exc:  # a connection dropped while streaming the body (urllib3's types)
            raise StorageError(f"get {self.uri(key)} failed: {_describe(exc)}") from None

    def list_keys(self, prefix: str) -> list[str]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"list {self.uri(prefix)} failed: {_describe(exc)}") from None

    def delete(self, uris: list[str]) -> int:
        """Delete objects by s3:// URI (any bucket), up to 1,000 per request; a missing object
        counts as deleted (S3 answers so). The number deleted; StorageError if any delete failed."""
        by_bucket: dict[str, list[str]] = {}
        for uri in dict.fromkeys(uris):
            bucket, key = split_uri(uri)
            by_bucket.setdefault(bucket, []).append(key)
        deleted = 0
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):
                chunk = keys[start : start + 1000]
                try:
                    response = self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True})
                except (ClientError, BotoCoreError) as exc:
                    raise StorageError(f"delete in s3://{bucket} failed: {_describe(exc)}") from None
                errors = response.get("Errors") or []
                deleted += len(chunk) - len(errors)
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"delete of {len(errors)} object(s) in s3://{bucket} failed, e.g. {first.get('Key')}: {first.get('Code')}"
                    )
        return deleted

    def head(self, key: str) -> dict[str, Any]:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"head {self.uri(key)} failed: {_describe(exc)}") from None

    def link(self, uri: str, seconds: int) -> str:
        """A presigned GET URL for an `s3://bucket/key` object, valid `seconds` (made locally: no call to S3)."""
        bucket, key = split_uri(uri)
        return self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds)

    def links(self, uris: list[str], seconds: int) -> list[str]:
        """`link` for each output; [] when they cannot be signed (no credentials: the s3:// URIs remain)."""
        try:
            return [self.link(uri, seconds) for uri in uris]
        except Exception as exc:
            log.warning("could not presign outputs: %s", type(exc).__name__)
            return []

    def presign(self, key: str, expires: int = 3600) -> str:
        try:
            return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires)
        except (ClientError, BotoCoreError) as exc:  # e.g. no credentials to sign with
            raise StorageError(f"presign {self.uri(key)} failed: {_describe(exc)}") from None


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def _describe(exc: Exception) -> str:
    # botocore messages carry the operation and the error code, never credentials.
    return f"{type(exc).__name__}: {str(exc)[:300]}"
