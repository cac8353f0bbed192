"""The job as callers see it: the contract's job JSON plus what needs the deployment's settings —
result links (presigned S3 URLs a browser can open) and the cost of its paid submissions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models import Job
from worker.config import Settings
from worker.core.jobs import to_json
from worker.errors import InvalidJobOperation

if TYPE_CHECKING:  # pragma: no cover  # a job without outputs needs no S3 client (nor boto3)
    from worker.adapters.storage import Storage


def job_view(job: Job, settings: Settings, storage: Storage | None = None) -> dict[str, Any]:
    """The job JSON with `output_urls` and `cost` filled in."""
    links = storage.links(list(job.outputs or []), settings.result_link_seconds) if storage is not None and job.outputs else []
    return to_json(job, output_urls=links, cost_per_submission=settings.cost_per_submission)


def nth_output_link(job: Job, index: int, storage: Storage, settings: Settings) -> str:
    """A fresh link to output `index` of a job (InvalidJobOperation if it has no such output)."""
    outputs = list(job.outputs or [])
    if not 0 <= index < len(outputs):
        raise InvalidJobOperation(f"job {job.id} has {len(outputs)} output(s); there is no output {index}")
    return storage.link(outputs[index], settings.result_link_seconds)
