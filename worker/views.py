"""The job as callers see it: the contract's job JSON plus what needs the deployment's settings —
result links (presigned S3 URLs a browser can open) and the cost of its paid submissions."""

from __future__ import annotations

import logging
from typing import Any

from models import Job
from worker.adapters.storage import Storage, split_uri
from worker.config import Settings
from worker.core.jobs import to_json
from worker.errors import InvalidJobOperation

log = logging.getLogger(__name__)


def output_link(storage: Storage, uri: str, seconds: int) -> str:
    """A presigned GET URL for one `s3://bucket/key` output (made locally: no call to S3)."""
    bucket, key = split_uri(uri)
    return storage.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds)


def output_links(storage: Storage | None, job: Job, seconds: int) -> list[str]:
    if storage is None or not job.outputs:
        return []
    try:
        return [output_link(storage, uri, seconds) for uri in job.outputs]
    except Exception as exc:  # no credentials to sign with: the s3:// URIs are still there
        log.warning("could not presign outputs: %s", type(exc).__name__, extra={"job_id": job.id})
        return []


def job_view(job: Job, settings: Settings, storage: Storage | None = None) -> dict[str, Any]:
    """The job JSON with `output_urls` and `cost` filled in."""
    return to_json(
        job, output_urls=output_links(storage, job, settings.result_link_seconds), cost_per_submission=settings.cost_per_submission
    )


def nth_output_link(job: Job, index: int, storage: Storage, settings: Settings) -> str:
    """A fresh link to output `index` of a job (InvalidJobOperation if it has no such output)."""
    outputs = list(job.outputs or [])
    if not 0 <= index < len(outputs):
        raise InvalidJobOperation(f"job {job.id} has {len(outputs)} output(s); there is no output {index}")
    return output_link(storage, outputs[index], settings.result_link_seconds)
