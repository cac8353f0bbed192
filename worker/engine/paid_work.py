"""The paid-work rule: after a paid submit, what may end a job. The poller and the copier ask
`may_end_paid_job` before they fail a job that has a prediction; nothing else decides it.
"""

from __future__ import annotations

from worker.errors import PermanentProviderError, ProviderError


def may_end_paid_job(error: ProviderError) -> bool:
    """After a paid submit, only a definitive provider answer ends the job; everything else is
    retried until the job's deadline.

    Definitive means the provider's own JSON envelope (`{"code": int, "message": str, ...}`)
    said it about this task: the task failed, was cancelled, timed out or was deleted; the task
    does not exist (envelope code 404 on its result); or the task completed and holds nothing
    that can be stored (no outputs, or an inline base64 output that is not a storable image).
    The WaveSpeed client marks exactly those errors `definitive`.

    Not definitive, so retried with backoff until the deadline (which fails the job as
    `deadline_exceeded`, keeping any outputs for `edit-worker retry`): HTML pages and other
    non-envelope bodies at any status (a proxy's 4xx page is not the provider's answer), another
    envelope 4xx on a result lookup, 5xx, 408, 429, timeouts, resets, truncated or garbage JSON,
    a prediction answered for another id, and every answer about an output URL (a CDN or a
    redirect cannot speak for the task): 4xx, refused redirects, wrong content types, oversize
    or endless bodies, slow drips. 401/403 on the API are systemic (the breaker), never the job's end.
    """
    return isinstance(error, PermanentProviderError) and error.definitive
