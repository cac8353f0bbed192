"""Specification of a submit answered with a prediction id another job already holds (a hostile or
broken provider): the answer is not this submit's, yet a task may have been created and billed, so
the job takes the ambiguous-submit path and the reconciler finds its real task; the reconciler's
sweep never crashes on it."""

from __future__ import annotations

import httpx

from tests.unit.conftest import envelope
from worker.engine import reconciler
from worker.engine.submit import run_submit


def submitted(deps, new_job, load, prompt: str) -> str:
    job_id = new_job(prompt=prompt)
    assert run_submit(deps, job_id).step == "poll"
    return job_id


def test_a_duplicate_prediction_id_on_submit_is_ambiguous_and_the_real_task_is_adopted(deps, new_job, load, fake_provider, clock):
    # Before: committing the duplicate id raised IntegrityError, the Redis journal kept it, and every
    # reconciler sweep crashed on it afterwards.
    first = submitted(deps, new_job, load, "first")
    taken = load(first).prediction_id
    second = new_job(prompt="second")
    fake_provider.script("submit", httpx.Response(200, json=envelope({"id": taken, "status": "created"})))
    real = fake_provider.create_task({"prompt": "second"}, via_submit=True)  # what the provider really made

    assert run_submit(deps, second) is None
    job = load(second)
    assert (job.state, job.prediction_id, job.error_code) == ("submitting", None, "ambiguous_submit")
    assert deps.journal.recall(second) is None  # the foreign id was never journaled

    clock.advance(120)
    report = reconciler.sweep(deps)
    assert report.ambiguous == {"adopted": 1}
    assert (load(second).state, load(second).prediction_id) == ("processing", real.id)
    assert load(first).prediction_id == taken


def test_a_duplicate_prediction_id_with_no_task_behind_it_is_resubmitted_once(deps, new_job, load, fake_provider, clock):
    first = submitted(deps, new_job, load, "first")
    second = new_job(prompt="second")
    fake_provider.script("submit", httpx.Response(200, json=envelope({"id": load(first).prediction_id, "status": "created"})))
    assert run_submit(deps, second) is None
    fake_provider.tasks.clear()  # the listing shows nothing for the window (the first is older)
    clock.advance(120)
    assert reconciler.sweep(deps).ambiguous == {"resubmitted": 1}
    assert load(second).state == "queued"
    assert run_submit(deps, second).step == "poll"
    assert len(fake_provider.submissions) == 1  # the cleared one aside: one real task for "second"
