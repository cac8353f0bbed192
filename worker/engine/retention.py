"""Retention: delete finished jobs (succeeded, failed, cancelled) that finished before a cutoff,
with their events and outbox rows and, on request, their input and output objects in S3.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Row, delete, func, select

from models import Job, JobEvent, Outbox
from worker.core.states import State
from worker.engine.deps import Deps
from worker.errors import InvalidInput, StorageError

log = logging.getLogger(__name__)

FINISHED = (State.SUCCEEDED.value, State.FAILED.value, State.CANCELLED.value)
_AGE = re.compile(r"^\s*(\d{1,9})\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_cutoff(text: str, now: datetime, *, what: str = "--finished-before") -> datetime:
    """`30d`, `12h`, `90m`, `3600s`, `2w` before `now`, or an ISO 8601 time (UTC if no zone).
    InvalidInput for anything else, or for a time in the future (`what`: the option, for messages)."""
    match = _AGE.match(text or "")
    if match:
        return now - timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2).lower()])
    try:
        when = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{what} must be an age like 30d, 12h, 2w or an ISO 8601 time; got {text!r}") from None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    if when > now:
        raise InvalidInput(f"{what} {text!r} is in the future")
    return when.astimezone(timezone.utc)


@dataclass
class PruneReport:
    finished_before: datetime
    dry_run: bool
    with_objects: bool
    jobs: int = 0
    events: int = 0
    outbox: int = 0
    objects: int = 0  # S3 objects deleted (or, in a dry run, that would be)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["finished_before"] = self.finished_before.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        return data


def object_uris(deps: Deps, job: Row) -> list[str]:
    """Every S3 object a finished job owns: its stored input, its recorded outputs and, for a job
    that did not succeed but reached the provider, whatever a partial copy left under its prefix."""
    uris = [uri for uri in [job.image_uri, *(job.outputs or [])] if isinstance(uri, str) and uri.startswith("s3://")]
    if job.state != State.SUCCEEDED.value and job.prediction_id:
        uris += [deps.storage.uri(key) for key in deps.storage.list_keys(deps.storage.output_prefix(job.id))]
    return list(dict.fromkeys(uris))


def _not_shared(session, rows: Sequence[Row], uris: list[str]) -> list[str]:
    """`uris` less the content-addressed inputs (`inputs/sha256-…`) another job, not in this
    batch, still uses: one stored image serves every job admitted with the same bytes."""
    digests = {row.image_sha256 for row in rows if row.image_uri in uris and row.image_sha256 and "/inputs/sha256-" in row.image_uri}
    if not digests:
        return uris
    ids = [row.id for row in rows]
    shared = set(
        session.scalars(
            select(Job.image_uri).where(Job.image_sha256.in_(sorted(digests)), Job.id.not_in(ids), Job.image_uri.in_(uris)).distinct()
        )
    )
    return [uri for uri in uris if uri not in shared]


def prune_finished(
    deps: Deps, finished_before: datetime, *, with_objects: bool = False, dry_run: bool = False, batch_size: int = 200
) -> PruneReport:
    """Delete jobs in a finished state whose finished_at is before `finished_before`, batch by
    batch, each batch one transaction: the rows are locked first (a concurrent `retry` waits, then
    finds them gone), then events and outbox rows, then (`with_objects`) the S3 objects, then the
    jobs. If S3 fails, that batch's rows stay (nothing refers to a deleted object) and
    StorageError says how far it got; running it again finishes the work."""
    report = PruneReport(finished_before=finished_before, dry_run=dry_run, with_objects=with_objects)
    last_id = ""
    while True:
        with deps.sessions() as session:
            query = (
                select(Job.id, Job.state, Job.image_uri, Job.image_sha256, Job.outputs, Job.prediction_id)
                .where(Job.state.in_(FINISHED), Job.finished_at < finished_before, Job.id > last_id)
                .order_by(Job.id)
                .limit(batch_size)
            )
            rows = session.execute(query if dry_run else query.with_for_update()).all()
            if not rows:
                break
            last_id = rows[-1].id
            ids = [row.id for row in rows]
            events = session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id.in_(ids))) or 0
            outbox = session.scalar(select(func.count()).select_from(Outbox).where(Outbox.job_id.in_(ids))) or 0
            try:
                uris = [uri for row in rows for uri in object_uris(deps, row)] if with_objects else []
                uris = _not_shared(session, rows, list(dict.fromkeys(uris)))
                if dry_run:
                    objects = len(uris)
                else:
                    session.execute(delete(JobEvent).where(JobEvent.job_id.in_(ids)))
                    session.execute(delete(Outbox).where(Outbox.job_id.in_(ids)))
                    objects = deps.storage.delete(uris) if uris else 0
                    session.execute(delete(Job).where(Job.id.in_(ids)))
                    session.commit()
            except StorageError as exc:
                session.rollback()
                done = "would prune" if dry_run else "pruned"
                raise StorageError(f"{exc}; {done} {report.jobs} job(s) before it, run prune again") from None
        report.jobs += len(ids)
        report.events += events
        report.outbox += outbox
        report.objects += objects
    if not dry_run and report.jobs:
        log.info(
            "pruned %d finished job(s) (%d events, %d outbox rows, %d objects) finished before %s",
            report.jobs,
            report.events,
            report.outbox,
            report.objects,
            finished_before.isoformat(),
        )
    return report
