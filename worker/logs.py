"""Log formatting with context: `job_id`, `prediction_id`, `state`, `attempt` appear as key=value.

Passed through `extra=`; never secrets, never base64 payloads (reprs of requests elide them).
"""

from __future__ import annotations

import logging

CONTEXT_FIELDS = ("job_id", "prediction_id", "state", "attempt", "outputs")


class ContextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if getattr(record, name, None) is not None)
        return f"{text} [{context}]" if context else text


def install(logger: logging.Logger | None = None, level: int | str | None = None) -> None:
    logger = logger or logging.getLogger()
    fmt = ContextFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    for handler in logger.handlers:
        handler.setFormatter(fmt)
    if level is not None:
        logger.setLevel(level)
