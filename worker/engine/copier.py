"""Copying a finished prediction's outputs into S3: download each (or decode its base64), store it
at its deterministic key, then `uploading -> succeeded`. The batch poller copies a batch inline
(`finish_many`); an upload task (`run_upload`) retries a copy that failed transiently.
"""

from __future__ import annotations

import base64
import binascii
import logging
import tempfile
from concurrent.futures import Executor

from sqlalchemy import select

from models import Job
from worker.adapters import tracing
from worker.adapters.storage import EXTENSIONS, extension_for, sniff_content_type
from worker.adapters.wavespeed import Prediction
from worker.core.backoff import compute_backoff
from worker.core.codes import ErrorCode, code_of
from worker.core.jobs import Move, transition_many, transition_now
from worker.core.states import State
from worker.core.steps import Next, Step
from worker.engine.bookkeeping import fail_deadline, fail_job
from worker.engine.deps import Deps
from worker.engine.faults import crashpoint
from worker.engine.paid_work import may_end_paid_job
from worker.engine.wakeups import wake_callbacks
from worker.errors import PermanentProviderError, TransientProviderError

log = logging.getLogger(__name__)


SPOOL_BYTES = 8 * 1024 * 1024
IMAGE_TYPES = frozenset(EXTENSIONS)  # what the magic bytes may say (storage.sniff_content_type)


def _decode_base64_output(value: str, max_bytes: int) -> bytes:
    """An inline output, decoded. Its faults are definitive: the provider's own completed envelope
    carries it, and the job keeps it as it is (a retry would decode the same text)."""
    # The provider sends bare base64; accept a data: URI as well.
    if value.startswith("data:"):
        value = value.split(",", 1)[1] if "," in value else ""
    if len(value) // 4 * 3 > max_bytes + 3:  # checked before decoding: never hold more than the cap
        raise PermanentProviderError(
            f"a base64 output is larger than {max_bytes} bytes", code=ErrorCode.OUTPUT_TOO_LARGE.value, definitive=True
        )
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PermanentProviderError(
            "an output is neither a URL nor valid base64", code=ErrorCode.BAD_OUTPUT.value, definitive=True
        ) from None
    if len(data) > max_bytes:
        raise PermanentProviderError(
            f"a base64 output is larger than {max_bytes} bytes", code=ErrorCode.OUTPUT_TOO_LARGE.value, definitive=True
        )
    return data


def copy_outputs(deps: Deps, job_id: str, outputs: list[str]) -> list[str]:
    """Download each output (or decode its base64), check its bytes are an image, and put it at
    its deterministic S3 key. PermanentProviderError: an output is unusable (definitive or not:
    see paid_work). TransientProviderError (download) and StorageError propagate for a retry:
    the keys are deterministic, so a retry overwrites what a crashed attempt left half-done."""
    max_bytes = deps.settings.max_output_bytes
    uris: list[str] = []
    for index, output in enumerate(outputs):
        # Spooled: small outputs stay in memory, large ones go to disk; the bytes are held once.
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as buf:
            inline = not output.startswith(("http://", "https://"))
            if inline:
                buf.write(_decode_base64_output(output, max_bytes))
            else:
                deps.provider.download(output, buf, max_bytes=max_bytes)
            crashpoint("mid_download")
            buf.seek(0)
            # The bytes decide, never a declared type: an HTML page served as image/png is refused.
            content_type = sniff_content_type(buf.read(16))
            if content_type not in IMAGE_TYPES:
                raise PermanentProviderError(f"output {index} is not an image", code=ErrorCode.OUTPUT_NOT_IMAGE.value, definitive=inline)
            buf.seek(0)
            key = deps.storage.key_for(job_id, index, extension_for(content_type))
            uris.append(deps.storage.put(key, buf, content_type))
    crashpoint("mid_upload")
    return uris


def _unusable(deps: Deps, job_id: str, exc: PermanentProviderError, context: dict | None = None) -> None:
    """An output could not be stored: fail the job only on a definitive answer (paid_work);
    otherwise raise TransientProviderError so the copy is retried until the deadline."""
    if may_end_paid_job(exc):
        fail_job(deps, job_id, State.UPLOADING, f"output unusable: {exc}", code_of(exc.code, ErrorCode.DOWNLOAD_FAILED), exc.message)
        return
    log.warning("output not stored yet, retried until the deadline: %s", exc, extra=context or {"job_id": job_id})
    raise TransientProviderError(f"output not stored yet: {exc.message}", code=exc.code, status_code=exc.status_code) from exc


def _succeed(deps: Deps, job_id: str, uris: list[str], context: dict | None = None) -> bool:
    moved = transition_now(
        deps.sessions,
        job_id,
        State.UPLOADING,
        State.SUCCEEDED,
        f"{len(uris)} output(s) stored in S3",
        clock=deps.clock,
        outputs=uris,
        provider_outputs=None,
        error_code=None,
        error_message=None,
    )
    if moved is not None:
        log.info("job succeeded", extra={**(context or {"job_id": job_id}), "outputs": len(uris)})
        wake_callbacks(deps, moved.callback_url is not None)
        note_copied(deps, 1)
    return moved is not None


def start_upload(deps: Deps, job_id: str, claim_seq: int, prediction: Prediction) -> bool:
    """processing -> uploading for a completed prediction, its outputs recorded on the row first
    (a CAS on the poller's claim version); False if another poller or a cancel took the job."""
    moved = transition_now(
        deps.sessions,
        job_id,
        State.PROCESSING,
        State.UPLOADING,
        f"prediction completed with {len(prediction.outputs)} output(s)",
        clock=deps.clock,
        where={"poll_seq": claim_seq},
        provider_outputs=prediction.outputs,
        has_nsfw_contents=prediction.has_nsfw_contents,
        next_poll_at=None,
    )
    return moved is not None


def run_upload(deps: Deps, job_id: str) -> Next | None:
    with deps.sessions() as session:
        row = session.execute(
            select(Job.state, Job.provider_outputs, Job.deadline_at, Job.tenant, Job.prediction_id, Job.trace_parent).where(
                Job.id == job_id
            )
        ).first()
        if row is None or row.state != State.UPLOADING.value:
            return None
        expired = deps.clock() >= row.deadline_at
        outputs = list(row.provider_outputs or [])
    if expired:
        fail_deadline(deps, job_id, State.UPLOADING)  # keeps provider_outputs for `retry`
        return None
    context = {"job_id": job_id, "tenant": row.tenant, "prediction_id": row.prediction_id, "trace_parent": row.trace_parent}
    with deps.tracing.step(tracing.COPY, row.trace_parent, job_id=job_id, tenant=row.tenant, prediction_id=row.prediction_id) as span:
        try:
            uris = copy_outputs(deps, job_id, outputs)
        except PermanentProviderError as exc:
            span.set(outcome="unusable")
            span.error(exc)
            _unusable(deps, job_id, exc, context)  # fails the job, or raises for a retry
            return None
        span.set(outcome="stored" if _succeed(deps, job_id, uris, context) else "lost")
    return None


def finish_inline(
    deps: Deps, job_id: str, claim_seq: int, prediction: Prediction, *, tenant: str | None = None, trace_parent: str | None = None
) -> Next | None:
    """Batch mode: the poller that saw a prediction complete copies its outputs at once (in its
    thread pool): processing -> uploading (outputs recorded first), copy, -> succeeded. If the copy
    fails transiently the job stays in `uploading` and an upload task retries it with backoff.
    `trace_parent`: the job's trace, which the copy's span joins."""
    if not start_upload(deps, job_id, claim_seq, prediction):
        return None  # another poller (or a cancel) took the job
    context = {"job_id": job_id, "tenant": tenant, "prediction_id": prediction.id, "trace_parent": trace_parent}
    with deps.tracing.step(tracing.COPY, trace_parent, job_id=job_id, tenant=tenant, prediction_id=prediction.id) as span:
        try:
            try:
                uris = copy_outputs(deps, job_id, list(prediction.outputs))
                span.set(outcome="stored" if _succeed(deps, job_id, uris, context) else "lost")
            except PermanentProviderError as exc:
                span.set(outcome="unusable")
                span.error(exc)
                _unusable(deps, job_id, exc, context)  # fails the job, or raises for a retry
                return None
        except Exception as exc:  # download, S3 or database trouble: the upload task retries with backoff
            span.set(outcome="retry")
            span.error(exc)
            log.warning("copying outputs failed, an upload task retries: %s", type(exc).__name__, extra=context)
            return _retry_upload(deps, job_id)
    return None


def finish_many(
    deps: Deps,
    finished: list[tuple[str, int, Prediction]],
    pool: Executor,
    contexts: dict[str, tuple[str | None, str | None]] | None = None,
) -> list[Next]:
    """Batch mode, a poller batch's completed predictions (job id, claim version, prediction):
    processing -> uploading for all of them in one statement (each a CAS on its claim version,
    outputs recorded first), the copies concurrently in `pool`, then uploading -> succeeded for
    every copied job in one statement. A job whose copy failed transiently stays in `uploading`
    and gets an upload task that retries it with backoff (what is returned). `contexts`: each
    job's (tenant, traceparent), so that its copy's span joins the job's trace."""
    if not finished:
        return []
    moves = [
        Move(
            job_id,
            f"prediction completed with {len(p.outputs)} output(s)",
            seq,
            {"provider_outputs": list(p.outputs), "has_nsfw_contents": list(p.has_nsfw_contents)},
        )
        for job_id, seq, p in finished
    ]
    try:
        started = transition_many(deps.sessions, State.PROCESSING, State.UPLOADING, moves, clock=deps.clock, next_poll_at=None)
    except Exception as exc:  # the database is down: the claims' lease runs out and they are polled again
        log.warning("recording %d completed prediction(s) failed: %s", len(finished), type(exc).__name__)
        return []
    mine = [(job_id, p) for job_id, _, p in finished if job_id in started]  # the rest: another poller or a cancel took them
    contexts = contexts or {}
    copied = list(pool.map(lambda item: _copy_one(deps, item[0], item[1], *contexts.get(item[0], (None, None))), mine))
    retries = [nxt for nxt in copied if isinstance(nxt, Next)]
    stored = [(job_id, uris) for (job_id, _), uris in zip(mine, copied) if isinstance(uris, list)]
    if stored:
        try:
            done = transition_many(
                deps.sessions,
                State.UPLOADING,
                State.SUCCEEDED,
                [Move(job_id, f"{len(uris)} output(s) stored in S3", None, {"outputs": uris}) for job_id, uris in stored],
                clock=deps.clock,
                provider_outputs=None,
                error_code=None,
                error_message=None,
            )
        except Exception as exc:  # the outputs are in S3: an upload task records them (overwriting the same keys)
            log.warning("recording %d copied job(s) failed, upload tasks retry: %s", len(stored), type(exc).__name__)
            return retries + [_retry_upload(deps, job_id) for job_id, _ in stored]
        wake_callbacks(deps, any(row.callback_url is not None for row in done.values()))
        note_copied(deps, len(done))
    return retries


def note_copied(deps: Deps, count: int) -> None:
    """Count jobs copied out, fleet-wide (adaptive pacing learns the copy-out rate from it)."""
    if count and deps.settings.adaptive_pacing:
        try:
            deps.fleet.note_copied(count)
        except Exception:  # Redis down: pacing falls back to its floor
            pass


def _retry_upload(deps: Deps, job_id: str) -> Next:
    s = deps.settings
    return Next(Step.UPLOAD, job_id, countdown=compute_backoff(0, base=s.backoff_base, maximum=s.backoff_max, rng=deps.rng))


def _copy_one(
    deps: Deps, job_id: str, prediction: Prediction, tenant: str | None = None, trace_parent: str | None = None
) -> list[str] | Next | None:
    """In a pool thread: one job's copy (a span in the job's trace). Its S3 URIs; a Next (an upload
    task) when it failed transiently; None when its outputs were unusable (the job failed, or raises
    for a retry)."""
    context = {"job_id": job_id, "tenant": tenant, "prediction_id": prediction.id, "trace_parent": trace_parent}
    with deps.tracing.step(tracing.COPY, trace_parent, job_id=job_id, tenant=tenant, prediction_id=prediction.id) as span:
        try:
            try:
                uris = copy_outputs(deps, job_id, list(prediction.outputs))
                span.set(outcome="stored")
                return uris
            except PermanentProviderError as exc:
                span.set(outcome="unusable")
                span.error(exc)
                _unusable(deps, job_id, exc, context)  # fails the job, or raises for a retry
                return None
        except Exception as exc:  # download, S3 or database trouble: the upload task retries with backoff
            span.set(outcome="retry")
            span.error(exc)
            log.warning("copying outputs failed, an upload task retries: %s", type(exc).__name__, extra=context)
            return _retry_upload(deps, job_id)
