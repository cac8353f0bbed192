"""The submission journal: which provider task a job's submit created, written to Redis the moment
the provider answers, so a worker that dies before its database commit leaves a certain trace for
the reconciler. `MemoryJournal` is the same in one process, for tests.
"""

from __future__ import annotations

import threading
from typing import Protocol

import redis

from worker.adapters.redis_keys import DEFAULT_NAMESPACE, RedisKeys

# As long as the provider keeps tasks listable.
JOURNAL_SECONDS = 7 * 24 * 3600


class Journal(Protocol):
    def remember(self, job_id: str, prediction_id: str) -> None: ...
    def recall(self, job_id: str) -> str | None: ...


class RedisJournal:
    """One key per job, kept for JOURNAL_SECONDS."""

    def __init__(self, client: redis.Redis, *, namespace: str = DEFAULT_NAMESPACE):
        self.r = client
        self.keys = RedisKeys(namespace)

    def remember(self, job_id: str, prediction_id: str) -> None:
        self.r.set(self.keys.journal(job_id), prediction_id, ex=JOURNAL_SECONDS)

    def recall(self, job_id: str) -> str | None:
        value = self.r.get(self.keys.journal(job_id))
        return value.decode() if isinstance(value, bytes) else value


class MemoryJournal:
    """The journal in one process (unit tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}

    def remember(self, job_id: str, prediction_id: str) -> None:
        with self._lock:
            self._entries[job_id] = prediction_id

    def recall(self, job_id: str) -> str | None:
        with self._lock:
            return self._entries.get(job_id)
