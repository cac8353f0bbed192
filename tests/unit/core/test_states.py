"""Specification of the job state machine (the table) and of `jobs.transition` (compare-and-set
plus one audit event per state change)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from models import Job, JobEvent
from worker.core.jobs import transition
from worker.core.states import ACTIVE, TERMINAL, TRANSITIONS, State, can_transition
from worker.errors import IllegalTransition

NON_TERMINAL = [State.QUEUED, State.SUBMITTING, State.PROCESSING, State.UPLOADING]


def test_the_happy_path_is_a_chain_of_allowed_edges():
    chain = [State.QUEUED, State.SUBMITTING, State.PROCESSING, State.UPLOADING, State.SUCCEEDED]
    for src, dst in zip(chain, chain[1:]):
        assert can_transition(src, dst), f"{src} -> {dst}"


@pytest.mark.parametrize("src", NON_TERMINAL)
@pytest.mark.parametrize("dst", [State.FAILED, State.CANCELLED])
def test_failed_and_cancelled_are_reachable_from_every_non_terminal_state(src, dst):
    assert can_transition(src, dst)


@pytest.mark.parametrize("src", [State.SUCCEEDED, State.CANCELLED])
def test_nothing_leaves_succeeded_or_cancelled(src):
    assert TRANSITIONS[src] == frozenset()
    assert not any(can_transition(src, dst) for dst in State)


def test_retry_edges_from_failed_resume_at_queued_processing_or_uploading():
    assert TRANSITIONS[State.FAILED] == {State.QUEUED, State.PROCESSING, State.UPLOADING}
    assert not can_transition(State.FAILED, State.SUCCEEDED)
    assert not can_transition(State.FAILED, State.SUBMITTING)


def test_submitting_may_go_back_to_queued_only_because_no_task_was_created():
    assert can_transition(State.SUBMITTING, State.QUEUED)
    # Once a prediction exists the job never goes back to queued (that would pay twice).
    assert not can_transition(State.PROCESSING, State.QUEUED)
    assert not can_transition(State.UPLOADING, State.QUEUED)
    assert not can_transition(State.UPLOADING, State.PROCESSING)


def test_no_state_transitions_to_itself():
    assert not any(can_transition(state, state) for state in State)


def test_every_state_has_a_row_and_terminal_and_active_partition_the_states():
    assert set(TRANSITIONS) == set(State)
    assert {State.SUCCEEDED, State.FAILED, State.CANCELLED} == TERMINAL
    assert set(State) == ACTIVE | TERMINAL and not ACTIVE & TERMINAL
    assert all(s.terminal for s in TERMINAL) and not any(s.terminal for s in ACTIVE)


def test_state_renders_as_its_value():
    assert f"{State.QUEUED}" == "queued" and str(State.FAILED) == "failed"
    assert State("processing") is State.PROCESSING


# --- jobs.transition -------------------------------------------------------------------------


def _events(sessions, job_id):
    with sessions() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def _state(sessions, job_id):
    with sessions() as s:
        return s.get(Job, job_id).state


def test_transition_moves_the_row_and_writes_exactly_one_event(sessions, new_job, clock):
    job_id = new_job()
    before = len(_events(sessions, job_id))
    clock.advance(5)
    with sessions() as s:
        assert transition(s, job_id, State.QUEUED, State.SUBMITTING, "submit attempt 1", clock=clock.now, attempts=1)
        s.commit()
    assert _state(sessions, job_id) == "submitting"
    events = _events(sessions, job_id)
    assert len(events) == before + 1
    last = events[-1]
    assert (last.from_state, last.to_state, last.reason) == ("queued", "submitting", "submit attempt 1")
    assert last.at == clock.now()
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 1 and job.updated_at == clock.now() and job.finished_at is None


def test_transition_returns_false_and_writes_nothing_when_the_row_is_not_in_src(sessions, new_job, clock):
    job_id = new_job()
    before = len(_events(sessions, job_id))
    with sessions() as s:
        # The job is queued, not processing: a stale message's CAS must fail.
        assert transition(s, job_id, State.PROCESSING, State.UPLOADING, "stale", clock=clock.now) is False
        s.commit()
    assert _state(sessions, job_id) == "queued"
    assert len(_events(sessions, job_id)) == before


def test_the_second_of_two_identical_transitions_loses(sessions, new_job, clock):
    job_id = new_job()
    with sessions() as s:
        assert transition(s, job_id, State.QUEUED, State.SUBMITTING, "first", clock=clock.now)
        s.commit()
    with sessions() as s:
        assert not transition(s, job_id, State.QUEUED, State.SUBMITTING, "second", clock=clock.now)
        s.commit()
    assert [e.reason for e in _events(sessions, job_id)][-1] == "first"


def test_transition_of_an_unknown_job_returns_false(sessions, clock):
    with sessions() as s:
        assert transition(s, "no-such-job", State.QUEUED, State.SUBMITTING, "x", clock=clock.now) is False


def test_transition_refuses_an_edge_not_in_the_table(sessions, new_job, clock):
    job_id = new_job()
    before = len(_events(sessions, job_id))
    with sessions() as s:
        with pytest.raises(IllegalTransition):
            transition(s, job_id, State.QUEUED, State.SUCCEEDED, "skip everything", clock=clock.now)
        s.commit()
    assert _state(sessions, job_id) == "queued"
    assert len(_events(sessions, job_id)) == before


@pytest.mark.parametrize("terminal", [State.FAILED, State.CANCELLED])
def test_a_terminal_transition_sets_finished_at_and_clears_the_schedule(sessions, new_job, clock, terminal):
    job_id = new_job()
    with sessions() as s:
        assert transition(s, job_id, State.QUEUED, State.SUBMITTING, "submit", clock=clock.now)
        assert transition(
            s, job_id, State.SUBMITTING, State.PROCESSING, "accepted", clock=clock.now, prediction_id="pred-x", next_poll_at=clock.now()
        )
        s.commit()
    clock.advance(30)
    with sessions() as s:
        assert transition(s, job_id, State.PROCESSING, terminal, "the end", clock=clock.now)
        s.commit()
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job.state == terminal.value
        assert job.finished_at == clock.now()
        assert job.next_poll_at is None and job.next_attempt_at is None


def test_a_non_terminal_transition_leaves_finished_at_unset(sessions, new_job, clock):
    job_id = new_job()
    with sessions() as s:
        transition(s, job_id, State.QUEUED, State.SUBMITTING, "submit", clock=clock.now)
        s.commit()
    with sessions() as s:
        assert s.get(Job, job_id).finished_at is None


def test_events_record_the_whole_history_in_order(sessions, new_job, clock):
    job_id = new_job()
    path = [State.QUEUED, State.SUBMITTING, State.PROCESSING, State.UPLOADING, State.SUCCEEDED]
    for src, dst in zip(path, path[1:]):
        clock.advance(1)
        with sessions() as s:
            assert transition(s, job_id, src, dst, f"to {dst}", clock=clock.now)
            s.commit()
    events = _events(sessions, job_id)
    assert [(e.from_state, e.to_state) for e in events] == [(None, "queued")] + [(a.value, b.value) for a, b in zip(path, path[1:])]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)) == 5
