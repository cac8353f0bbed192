"""The job state machine: the states and the allowed transitions, at one glance.

Every state change in the system goes through `jobs.transition`, which checks this table.
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    QUEUED = "queued"
    SUBMITTING = "submitting"
    PROCESSING = "processing"
    UPLOADING = "uploading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # so f-strings and logs show "queued", not "State.QUEUED"
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
ACTIVE = frozenset(State) - TERMINAL

_S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    # failed / cancelled are reachable from every non-terminal state.
    _S.QUEUED: frozenset({_S.SUBMITTING, _S.FAILED, _S.CANCELLED}),
    # submitting -> queued: the provider provably created no task (it answered an error, or the
    # reconciler found none for an ambiguous submit), so the job waits for another attempt.
    _S.SUBMITTING: frozenset({_S.PROCESSING, _S.QUEUED, _S.FAILED, _S.CANCELLED}),
    _S.PROCESSING: frozenset({_S.UPLOADING, _S.FAILED, _S.CANCELLED}),
    _S.UPLOADING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.CANCELLED}),
    _S.SUCCEEDED: frozenset(),
    # retry (the dead-letter replay) resumes from the furthest step already paid for:
    # re-upload known outputs, re-poll a known prediction, or resubmit when none exists.
    _S.FAILED: frozenset({_S.QUEUED, _S.PROCESSING, _S.UPLOADING}),
    _S.CANCELLED: frozenset(),
}


def can_transition(src: State, dst: State) -> bool:
    return dst in TRANSITIONS[src]
