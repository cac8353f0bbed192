"""The in-memory submission journal (the Redis one: tests/integration/test_limits.py)."""

from __future__ import annotations

from worker.adapters.journal import MemoryJournal


def test_the_submission_journal_remembers_by_job():
    journal = MemoryJournal()
    assert journal.recall("job-1") is None
    journal.remember("job-1", "pred-9")
    assert journal.recall("job-1") == "pred-9"
    assert journal.recall("job-2") is None
