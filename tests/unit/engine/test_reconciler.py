"""Specification of recovery: the outbox relay, the stuck-job sweep, and ambiguous-submit
resolution (never pay twice: adopt the provider's task when it provably exists, resubmit only when
it provably does not, ask an operator otherwise)."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from models import Outbox
from worker.core.codes import ErrorCode
from worker.core.jobs import transition
from worker.core.states import State
from worker.engine.copier import run_upload
from worker.engine.poller import run_poll
from worker.engine.reconciler import relay_outbox, resolve_ambiguous, resolve_by_operator, sweep
from worker.engine.submit import run_submit
from worker.errors import InvalidJobOperation


def sent_steps(publisher, job_id=None) -> list[tuple]:
    return [(step, jid, seq) for step, jid, _cd, seq in publisher.sent if job_id is None or jid == job_id]


def window_over(deps) -> float:
    """Seconds after a submit at which the reconciler may decide about it."""
    s = deps.settings
    return s.http_timeout + 2 * s.ambiguous_skew_seconds + s.ambiguous_list_grace_seconds + 1


def ambiguous_job(deps, new_job, fake_provider, *, task_created: bool, prompt: str = "make the sky purple") -> str:
    """A job whose submit timed out: the provider did (or did not) create the task."""
    timeout = httpx.ReadTimeout("read timed out")
    fake_provider.script("submit", fake_provider.After(timeout) if task_created else timeout)
    job_id = new_job(prompt=prompt)
    assert run_submit(deps, job_id) is None
    return job_id


# --- outbox relay ---------------------------------------------------------------------------


def test_relay_publishes_each_unsent_row_once_and_marks_it_sent(deps, new_job, publisher, sessions, clock):
    a, b = new_job(prompt="a"), new_job(prompt="b")
    assert relay_outbox(deps) == 2
    assert sent_steps(publisher) == [("submit", a, None), ("submit", b, None)]
    with sessions() as s:
        assert all(row.sent_at == clock.now() for row in s.scalars(select(Outbox)))
    assert relay_outbox(deps) == 0
    assert len(publisher.sent) == 2


def test_relay_leaves_rows_it_could_not_publish_for_the_next_run(deps, new_job, sessions):
    a, b = new_job(prompt="a"), new_job(prompt="b")

    class BrokerDiesAfterOne:
        def __init__(self):
            self.sent = []

        def publish(self, step, job_id, *, countdown=0.0, poll_seq=None):
            if self.sent:
                raise ConnectionError("broker went away")
            self.sent.append((step, job_id))

    deps.publisher = BrokerDiesAfterOne()
    with pytest.raises(ConnectionError):
        relay_outbox(deps)
    with sessions() as s:
        assert {row.job_id: row.sent_at is not None for row in s.scalars(select(Outbox))} == {a: True, b: False}

    deps.publisher = recorder = type(deps.publisher)()
    assert relay_outbox(deps) == 1
    assert recorder.sent == [("submit", b)]


def test_relay_waits_for_rows_younger_than_older_than(deps, new_job, clock, publisher):
    new_job()
    assert relay_outbox(deps, older_than=2.0) == 0  # the producer's eager publish gets its chance first
    clock.advance(3)
    assert relay_outbox(deps, older_than=2.0) == 1


# --- sweep ----------------------------------------------------------------------------------


def test_sweep_redrives_a_processing_job_whose_next_poll_is_long_past(deps, new_job, publisher, load, clock, fake_provider):
    job_id = new_job()
    first = run_submit(deps, job_id)
    relay_outbox(deps)
    publisher.sent.clear()
    clock.advance(deps.settings.stuck_after_seconds + 60)  # the poll message was lost

    report = sweep(deps)
    job = load(job_id)
    assert job.poll_seq == first.poll_seq + 1
    assert sent_steps(publisher) == [("poll", job_id, job.poll_seq)]
    assert report.redriven == {"processing": 1}
    # The lost chain, should it come back, is stale now; the new one works.
    assert run_poll(deps, job_id, first.poll_seq) is None
    assert run_poll(deps, job_id, job.poll_seq).step == "upload"


def test_sweep_redrives_a_queued_job_with_no_pending_outbox(deps, new_job, publisher, clock):
    job_id = new_job()
    relay_outbox(deps)  # the submit message was published ... and lost
    publisher.sent.clear()
    clock.advance(deps.settings.stuck_after_seconds + 1)
    report = sweep(deps)
    assert sent_steps(publisher) == [("submit", job_id, None)]
    assert report.redriven == {"queued": 1}
    # Touched: the next sweep waits a full period again.
    publisher.sent.clear()
    clock.advance(5)
    sweep(deps)
    assert publisher.sent == []


def test_sweep_publishes_a_long_unsent_outbox_row_exactly_once(deps, new_job, publisher, clock):
    job_id = new_job()  # the producer's eager publish failed (broker down) for a long time
    clock.advance(deps.settings.stuck_after_seconds + 1)
    report = sweep(deps)
    assert report.relayed == 1
    assert sent_steps(publisher) == [("submit", job_id, None)]


def test_sweep_redrives_a_job_stuck_in_uploading(deps, new_job, publisher, clock, load):
    job_id = new_job()
    first = run_submit(deps, job_id)
    assert run_poll(deps, job_id, first.poll_seq).step == "upload"
    relay_outbox(deps)
    publisher.sent.clear()
    clock.advance(deps.settings.stuck_after_seconds + 1)
    sweep(deps)
    assert sent_steps(publisher) == [("upload", job_id, None)]
    assert run_upload(deps, job_id) is None
    assert load(job_id).state == "succeeded"


def test_sweep_leaves_jobs_that_are_on_schedule_alone(deps, new_job, publisher, clock, fake_provider, load):
    fake_provider.polls_to_complete = 10
    queued = new_job(prompt="queued")
    processing = new_job(prompt="processing")
    run_submit(deps, processing)
    relay_outbox(deps)
    publisher.sent.clear()
    clock.advance(5)
    report = sweep(deps)
    assert publisher.sent == [] and report.redriven == {}
    assert {load(queued).state, load(processing).state} == {"queued", "processing"}


def test_sweep_fails_jobs_past_their_deadline_and_cancels_their_provider_task(deps, new_job, load, clock, fake_provider, publisher):
    fake_provider.auto_outcome = None
    job_id = new_job(deadline_seconds=120)
    run_submit(deps, job_id)
    clock.advance(121)
    report = sweep(deps)
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert report.deadline_failed == 1
    assert fake_provider.cancelled == [job.prediction_id]
    assert not [m for m in publisher.sent if m[0] == "poll"]


def test_sweep_does_not_redrive_a_queued_job_waiting_out_its_backoff(deps, new_job, publisher, clock):
    job_id = new_job()
    relay_outbox(deps)
    publisher.sent.clear()
    # A breaker deferral far in the future: the job is not stuck, it is waiting.
    from worker.core.jobs import update_if

    with deps.sessions() as s:
        update_if(s, job_id, State.QUEUED, clock=deps.clock, next_attempt_at=clock.now() + timedelta(seconds=600))
        s.commit()
    clock.advance(deps.settings.stuck_after_seconds + 1)
    sweep(deps)
    assert publisher.sent == []


# --- ambiguous submits ----------------------------------------------------------------------


def test_ambiguous_submit_is_not_resubmitted_when_provider_has_the_task(deps, new_job, fake_provider, publisher, clock, load, drive):
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=True)
    [task] = fake_provider.submissions
    clock.advance(window_over(deps))

    report = sweep(deps)
    assert report.ambiguous == {"adopted": 1}
    job = load(job_id)
    assert job.state == "processing" and job.prediction_id == task.id
    assert job.error_code is None
    assert sent_steps(publisher, job_id) == [("submit", job_id, None), ("poll", job_id, job.poll_seq)]
    # The list query covered the submit's time window for this model.
    [query] = fake_provider.list_bodies
    assert query["model"] == "bytedance/dreamina-v3.0/edit" and query["created_after"] and query["created_before"]

    drive(job_id, "poll")
    assert load(job_id).state == "succeeded"
    assert len(fake_provider.submissions) == 1


def test_a_journaled_prediction_is_adopted_without_asking_the_provider(
    deps, new_job, fake_provider, journal, load, publisher, sessions, clock
):
    # The worker died right after the provider answered and the id was journaled (before the commit).
    job_id = new_job()
    with sessions() as s:
        assert transition(
            s, job_id, State.QUEUED, State.SUBMITTING, "submit attempt 1", clock=clock.now, attempts=1, submitted_at=clock.now()
        )
        s.commit()
    task = fake_provider.create_task({"prompt": "make the sky purple"}, via_submit=True)
    journal.remember(job_id, task.id)

    assert resolve_ambiguous(deps, load(job_id)) == "adopted"
    job = load(job_id)
    assert job.state == "processing" and job.prediction_id == task.id
    assert fake_provider.calls["list"] == 0
    assert sent_steps(publisher, job_id)[-1] == ("poll", job_id, job.poll_seq)


def test_an_ambiguous_submit_is_not_decided_before_its_time_window_is_over(deps, new_job, fake_provider, load, publisher):
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=False)
    assert resolve_ambiguous(deps, load(job_id)) == "waiting"
    assert fake_provider.calls["list"] == 0
    assert load(job_id).state == "submitting"


def test_an_ambiguous_submit_without_a_provider_task_is_resubmitted(deps, new_job, fake_provider, publisher, clock, load, drive):
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=False)
    assert fake_provider.tasks == {}
    clock.advance(window_over(deps))

    report = sweep(deps)
    assert report.ambiguous == {"resubmitted": 1}
    job = load(job_id)
    assert job.state == "queued" and job.error_code is None
    assert sent_steps(publisher, job_id)[-1] == ("submit", job_id, None)

    drive(job_id)
    assert load(job_id).state == "succeeded"
    assert len(fake_provider.submissions) == 1  # the first attempt created nothing
    assert load(job_id).attempts == 2


def test_a_task_claimed_by_another_job_is_not_a_candidate(deps, new_job, fake_provider, clock, load):
    other = new_job(prompt="someone else's job")
    run_submit(deps, other)  # its task is in the same window, but it is claimed
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=True)
    mine = fake_provider.submissions[-1]
    clock.advance(window_over(deps))

    assert resolve_ambiguous(deps, load(job_id)) == "adopted"
    assert load(job_id).prediction_id == mine.id
    assert load(other).prediction_id != mine.id


def test_two_unclaimed_candidates_leave_the_job_for_an_operator(deps, new_job, fake_provider, clock, load, publisher):
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=True)
    clock.advance(2)
    fake_provider.create_task({"prompt": "submitted by another tool on the same account"})
    clock.advance(window_over(deps))

    report = sweep(deps)
    assert report.ambiguous == {"needs_operator": 1}
    job = load(job_id)
    assert job.state == "submitting"
    assert job.error_code == ErrorCode.NEEDS_OPERATOR.value
    assert "edit-worker resolve" in job.error_message
    assert job.prediction_id is None
    assert len(fake_provider.submissions) == 1
    assert sent_steps(publisher, job_id) == [("submit", job_id, None)]  # nothing new scheduled
    # Later sweeps leave it alone (the operator decides).
    lists = fake_provider.calls["list"]
    clock.advance(300)
    sweep(deps)
    assert fake_provider.calls["list"] == lists and load(job_id).state == "submitting"


def two_parked(deps, new_job, fake_provider, clock, load) -> tuple[str, str]:
    """Two ambiguous submits in one window, one of which made a task: both parked for an operator."""
    a = ambiguous_job(deps, new_job, fake_provider, task_created=True, prompt="a")
    b = ambiguous_job(deps, new_job, fake_provider, task_created=False, prompt="b")
    clock.advance(window_over(deps))
    # The one task could be either job's: guessing could give a job someone else's edit.
    assert resolve_ambiguous(deps, load(a)) == "needs_operator"
    assert resolve_ambiguous(deps, load(b)) == "needs_operator"
    return a, b


def test_one_task_but_two_unresolved_submits_in_the_window_needs_an_operator(deps, new_job, fake_provider, clock, load):
    a, b = two_parked(deps, new_job, fake_provider, clock, load)
    assert load(a).prediction_id is None and load(b).prediction_id is None
    assert len(fake_provider.submissions) == 1


# --- operator resolution --------------------------------------------------------------------


def test_the_operator_can_adopt_a_named_prediction(deps, new_job, fake_provider, clock, load, publisher, drive):
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=True)
    [task] = fake_provider.submissions
    assert resolve_by_operator(deps, job_id, adopt=task.id) == "adopted"
    job = load(job_id)
    assert job.state == "processing" and job.prediction_id == task.id
    assert sent_steps(publisher, job_id)[-1] == ("poll", job_id, job.poll_seq)
    drive(job_id, "poll")
    assert load(job_id).state == "succeeded" and len(fake_provider.submissions) == 1


def test_the_operator_can_order_a_resubmit(deps, new_job, fake_provider, load, publisher):
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=False)
    assert resolve_by_operator(deps, job_id, resubmit=True) == "resubmitted"
    job = load(job_id)
    assert job.state == "queued" and job.error_code is None
    assert sent_steps(publisher, job_id)[-1] == ("submit", job_id, None)
    assert run_submit(deps, job_id).step == "poll"


def test_operator_resolution_applies_only_to_jobs_stuck_in_submitting(deps, new_job):
    job_id = new_job()
    with pytest.raises(InvalidJobOperation):
        resolve_by_operator(deps, job_id, resubmit=True)


@pytest.mark.parametrize("adopt, resubmit", [(None, False), ("pred-0001", True)])
def test_the_operator_must_choose_exactly_one_answer(deps, new_job, fake_provider, adopt, resubmit):
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=True)
    with pytest.raises(InvalidJobOperation):
        resolve_by_operator(deps, job_id, adopt=adopt, resubmit=resubmit)


def test_the_operator_cannot_adopt_a_prediction_another_job_owns(deps, new_job, fake_provider, load):
    owner = new_job(prompt="owner")
    run_submit(deps, owner)
    owned = load(owner).prediction_id
    job_id = ambiguous_job(deps, new_job, fake_provider, task_created=True)
    with pytest.raises(InvalidJobOperation):
        resolve_by_operator(deps, job_id, adopt=owned)
    assert load(job_id).state == "submitting" and load(owner).prediction_id == owned


def test_settling_one_parked_submit_lets_the_reconciler_settle_the_other(deps, new_job, fake_provider, clock, load):
    a, b = two_parked(deps, new_job, fake_provider, clock, load)
    [task] = fake_provider.submissions
    # The operator knows b's submit never reached the provider: with b out of the window, the one
    # unclaimed task can only be a's, and the reconciler adopts it without being asked.
    assert resolve_by_operator(deps, b, resubmit=True) == "resubmitted"
    assert load(b).state == "queued"
    job_a = load(a)
    assert job_a.state == "processing" and job_a.prediction_id == task.id and job_a.error_code is None
    assert len(fake_provider.submissions) == 1
