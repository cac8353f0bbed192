"""The one exception hierarchy of the worker, rooted in EditWorkerError.

Callers catch by class, never by message text; no message ever carries a secret.
"""

from __future__ import annotations


class EditWorkerError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidInput(EditWorkerError, ValueError):
    """A producer's request is wrong (prompt, size, seed, image, URL); nothing was queued."""


class JobNotFound(EditWorkerError, LookupError):
    """No job has that id."""


class DeliveryNotFound(EditWorkerError, LookupError):
    """No callback delivery has that id."""


class IllegalTransition(EditWorkerError):
    """A state change the state machine does not allow (or the row was no longer in the expected state)."""


class IdempotencyConflict(EditWorkerError):
    """Concurrent producers kept racing on the same idempotency keys; nothing was created."""


class IdempotencyMismatch(EditWorkerError):
    """An idempotency key was reused with a different request (HTTP 409); nothing was created."""


class QuotaExceeded(EditWorkerError):
    """A tenant is over its submission rate or daily budget (HTTP 429); `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class Unauthorized(EditWorkerError):
    """No API key, or an unknown or revoked one (HTTP 401)."""


class InvalidJobOperation(EditWorkerError):
    """The operation does not apply to the job in its current state (e.g. retry of a succeeded job)."""


class StorageError(EditWorkerError):
    """S3 could not store or read an object; transient: the step is retried."""


class AdmissionUnavailable(StorageError):
    """A new job's input image could not be stored (S3 unavailable): nothing was queued. Transient:
    the producer should try again (HTTP 503 with Retry-After; the CLI exits 1)."""

    retry_after = 5


class ProviderError(EditWorkerError):
    """Anything the provider answered (or failed to answer) that is not a usable result."""

    def __init__(self, message: str, *, code: str | int | None = None, status_code: int | None = None, definitive: bool = False):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code
        # True only when the provider's own JSON envelope gave this answer about the task (it
        # failed, was cancelled, timed out, was deleted, or does not exist): the one kind of
        # answer that may end a job after its paid submit (worker.engine.paid_work).
        self.definitive = definitive

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.append(f"(HTTP {self.status_code})")
        return " ".join(parts)


class TransientProviderError(ProviderError):
    """Worth retrying after a backoff: connect errors, timeouts on GET, 429, 5xx, HTML error pages."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class AmbiguousSubmitError(TransientProviderError):
    """The submit request may have reached the provider (timeout after sending, connection reset):
    a task may exist and be billed, so the job must not be blindly resubmitted."""


class PermanentProviderError(ProviderError):
    """Retrying cannot help: validation (400), moderation, unreachable input media, task `failed`."""


class ProviderAuthError(ProviderError):
    """401/403: bad key or no credit. Systemic: open the breaker, stop submitting, keep jobs queued."""


class UnsupportedDatabase(EditWorkerError):
    """The database server is older than the oldest one supported (PostgreSQL 14)."""


class UnsupportedRedis(EditWorkerError):
    """The Redis server is older than the oldest one every command and script here runs on."""
