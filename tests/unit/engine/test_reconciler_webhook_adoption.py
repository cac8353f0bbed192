"""Specification of adopting a prediction named by a job's own webhook: the token proves the URL
is the job's, not that the prediction is the job's submit; the provider must confirm the model
and that the prediction was created inside the job's submit window before it is attached."""

from __future__ import annotations

from datetime import timedelta

import httpx

from worker.engine.reconciler import adopt_from_webhook
from worker.engine.submit import run_submit


def ambiguous_job(deps, new_job, fake_provider) -> str:
    """A job whose submit timed out after the provider created its task."""
    fake_provider.script("submit", fake_provider.After(httpx.ReadTimeout("read timed out")))
    job_id = new_job()
    assert run_submit(deps, job_id) is None
    return job_id


def test_the_jobs_own_prediction_is_adopted(deps, new_job, fake_provider, load):
    job_id = ambiguous_job(deps, new_job, fake_provider)
    [task] = fake_provider.submissions

    assert adopt_from_webhook(deps, job_id, task.id) == "adopted"
    assert load(job_id).prediction_id == task.id


def test_a_prediction_created_long_before_the_submit_is_not_adopted(deps, new_job, fake_provider, clock, load):
    # e.g. a webhook of another, older task replayed against this job's URL.
    old = fake_provider.create_task({"prompt": "someone else's edit"}, created_at=clock.now() - timedelta(hours=2))
    job_id = ambiguous_job(deps, new_job, fake_provider)

    assert adopt_from_webhook(deps, job_id, old.id) == "outside_submit_window"
    job = load(job_id)
    assert (job.state, job.prediction_id) == ("submitting", None)


def test_a_prediction_created_after_the_submit_window_is_not_adopted(deps, new_job, fake_provider, clock, load):
    job_id = ambiguous_job(deps, new_job, fake_provider)
    late = fake_provider.create_task(
        created_at=clock.now() + timedelta(seconds=deps.settings.http_timeout + deps.settings.ambiguous_skew_seconds + 5)
    )

    assert adopt_from_webhook(deps, job_id, late.id) == "outside_submit_window"
    assert load(job_id).prediction_id is None


def test_a_prediction_of_another_model_is_not_adopted(deps, new_job, fake_provider, load):
    job_id = ambiguous_job(deps, new_job, fake_provider)
    [task] = fake_provider.submissions
    answer = fake_provider._prediction(task) | {"model": "some/other-model"}
    fake_provider.script("result", httpx.Response(200, json={"code": 200, "message": "success", "data": answer}))

    assert adopt_from_webhook(deps, job_id, task.id) == "wrong_model"
    assert load(job_id).prediction_id is None


def test_a_prediction_the_provider_does_not_know_is_not_adopted(deps, new_job, fake_provider, load):
    job_id = ambiguous_job(deps, new_job, fake_provider)

    assert adopt_from_webhook(deps, job_id, "pred-made-up") == "unverified"
    assert load(job_id).prediction_id is None


def test_a_prediction_id_that_is_not_of_the_providers_form_is_never_put_in_a_url(deps, new_job, fake_provider, load):
    job_id = ambiguous_job(deps, new_job, fake_provider)
    before = len(fake_provider.requests)

    assert adopt_from_webhook(deps, job_id, "../../api/v3/balance") == "unverified"
    assert len(fake_provider.requests) == before
    assert load(job_id).prediction_id is None
