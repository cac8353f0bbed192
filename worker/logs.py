"""Log formatting with context: `job_id`, `tenant`, `prediction_id`, `state`, `attempt`, `trace_id`
as key=value (text) or as fields of one JSON object a line (json), with secrets masked.

Context comes through `extra=`; a `trace_parent` there (the job's W3C traceparent) shows as its
`trace_id`. Never secrets: bearer tokens, `whsec_` webhook secrets, presigned-URL signatures and
the configured secret values are masked on every line, whatever a message carries.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

CONTEXT_FIELDS = ("job_id", "tenant", "prediction_id", "state", "attempt", "outputs", "delivery_id", "trace_id")

MASK = "***"

# What looks like a credential whatever its source: an Authorization value, a Standard Webhooks
# secret, and the signing parts of a presigned S3 URL (SigV4 and SigV2) or a token in a query.
_PATTERNS = (
    re.compile(r"(?i)(\bbearer\s+)[^\s'\",;]+"),
    re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+"),
    re.compile(
        r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|awsaccesskeyid|sig|token|api_key|apikey|key|secret)=)[^&\s'\"#]*"
    ),
)


class Redactor:
    """Masks credential-shaped text and the given secret values (those of the settings) in a line."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole; very short values are
        # skipped (masking "ab" everywhere would garble lines and hide nothing worth hiding).
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MASK, text)
        return text


def trace_id_of(record: logging.LogRecord) -> str | None:
    """The trace id (32 hex) of the job's traceparent in the record's `extra`, if any."""
    trace_parent = getattr(record, "trace_parent", None)
    if isinstance(trace_parent, str) and len(trace_parent) >= 35:
        return trace_parent[3:35]
    return getattr(record, "trace_id", None)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in CONTEXT_FIELDS:
        value = trace_id_of(record) if name == "trace_id" else getattr(record, name, None)
        if value is not None:
            values[name] = value
    return values


class ContextFormatter(logging.Formatter):
    """Text: the usual line, then ` [job_id=… tenant=… …]`, masked."""

    def __init__(self, fmt: str | None = None, *, redact: Redactor | None = None) -> None:
        super().__init__(fmt)
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(f"{name}={value}" for name, value in _context(record).items())
        return self.redact(f"{text} [{context}]" if context else text)


class JsonFormatter(logging.Formatter):
    """JSON: one object a line with time (UTC, ISO 8601), level, logger, message, process, the
    job's context fields and, for an exception, `exc`; masked."""

    def __init__(self, *, redact: Redactor | None = None) -> None:
        super().__init__()
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
            "process": record.processName,
        }
        for name, value in _context(record).items():
            entry[name] = value if isinstance(value, (int, float, bool)) else self.redact(str(value))
        if record.exc_info:
            entry["exc"] = self.redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def formatter(fmt: str = "text", secrets: Iterable[str | None] = ()) -> logging.Formatter:
    """The formatter for EDIT_WORKER_LOG_FORMAT (`text` or `json`), masking `secrets`."""
    redact = Redactor(secrets)
    return JsonFormatter(redact=redact) if fmt == "json" else ContextFormatter(TEXT_FORMAT, redact=redact)


def install(
    logger: logging.Logger | None = None, level: int | str | None = None, *, fmt: str = "text", secrets: Iterable[str | None] = ()
) -> None:
    """Give `logger`'s handlers (a stream handler if it has none) the formatter for `fmt`."""
    logger = logger or logging.getLogger()
    chosen = formatter(fmt, secrets)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    for handler in logger.handlers:
        handler.setFormatter(chosen)
    if level is not None:
        logger.setLevel(level)
