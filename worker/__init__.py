"""edit-worker: durable WaveSpeed Dreamina V3.0 Edit jobs on Celery, S3 and SQL.

The public producer API: `submit_edit`, `submit_edit_many`, `get_job`, `wait_for`, and the errors.
Imports are lazy so that light entry points (the sandbox server) don't load Celery or SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "AdmissionUnavailable",
    "EditWorkerError",
    "InvalidInput",
    "InvalidJobOperation",
    "JobNotFound",
    "WaitTimeout",
    "get_job",
    "submit_edit",
    "submit_edit_many",
    "wait_for",
]

if TYPE_CHECKING:  # pragma: no cover
    from worker.errors import AdmissionUnavailable, EditWorkerError, InvalidInput, InvalidJobOperation, JobNotFound
    from worker.producer import WaitTimeout, get_job, submit_edit, submit_edit_many, wait_for


def __getattr__(name: str):
    if name in ("submit_edit", "submit_edit_many", "get_job", "wait_for", "WaitTimeout"):
        from worker import producer

        return getattr(producer, name)
    if name in ("EditWorkerError", "InvalidInput", "JobNotFound", "InvalidJobOperation", "AdmissionUnavailable"):
        from worker import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
