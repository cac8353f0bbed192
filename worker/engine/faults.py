"""Crash points for the fault tests: `EDIT_WORKER_CRASHPOINT=<point>:<marker file>` makes the first
process that reaches <point> SIGKILL itself (the marker makes it happen exactly once).

Unset in production, where `crashpoint()` is a dictionary lookup and a return.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "before_submit",  # queued -> submitting committed, provider not called yet
    "after_submit",  # the provider answered (task created, billed), nothing recorded yet
    "after_journal",  # prediction id journaled in Redis, database commit not done
    "mid_poll",  # the result was read, the row not updated
    "mid_download",  # an output downloaded, not stored
    "mid_upload",  # outputs stored in S3, the final commit not done
)


def crashpoint(name: str) -> None:
    spec = os.environ.get("EDIT_WORKER_CRASHPOINT")
    if not spec:
        return
    point, _, marker = spec.partition(":")
    if point != name or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
