"""Specification of the paid-work rule (worker/engine/paid_work.py): after a paid submit, only a
definitive provider answer ends the job; everything else is retried until the job's deadline."""

from __future__ import annotations

import base64
import json
import random
from datetime import timedelta

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.adapters.breaker import MemoryBreaker
from worker.adapters.fleet import MemoryFleet
from worker.adapters.journal import MemoryJournal
from worker.adapters.limiter import MemoryLimiter
from worker.core.steps import Next, RecordingPublisher
from worker.engine.copier import finish_inline, run_upload
from worker.engine.deps import Deps, make_provider
from worker.engine.operator import retry_job
from worker.engine.paid_work import may_end_paid_job
from worker.engine.poller import Fail, Finish, Reschedule, fetch_and_decide, run_poll
from worker.engine.submit import run_submit
from worker.errors import PermanentProviderError, ProviderAuthError, TransientProviderError

PID = "pred-0001"
HTML_404 = "<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1><hr><center>nginx</center></body></html>"
HTML = {"content-type": "text/html; charset=utf-8"}
FINAL = {"failed", "cancelled", "timeout", "deleted", "completed"}


def submitted(deps, job_id) -> Next:
    nxt = run_submit(deps, job_id)
    assert nxt is not None and nxt.step == "poll", nxt
    return nxt


def to_upload(deps, job_id) -> None:
    first = submitted(deps, job_id)
    assert run_poll(deps, job_id, first.poll_seq) == Next("upload", job_id)


# --- the rule itself ------------------------------------------------------------------------


def test_only_a_definitive_permanent_error_may_end_a_paid_job():
    assert may_end_paid_job(PermanentProviderError("task failed", code="task_failed", definitive=True))
    assert not may_end_paid_job(PermanentProviderError("proxy said 404", code=404))
    assert not may_end_paid_job(TransientProviderError("502", code=502))
    assert not may_end_paid_job(ProviderAuthError("401", code=401))


# --- any answer to a result lookup ----------------------------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
JSON_ANY = st.recursive(
    JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=10
)
DATA = st.fixed_dictionaries(
    {
        "id": st.one_of(st.just(PID), st.just("pred-9999"), JSON_LEAF),
        "status": st.one_of(
            st.sampled_from(["created", "processing", "completed", "failed", "cancelled", "timeout", "deleted", "FAILED"]), JSON_LEAF
        ),
    },
    optional={"outputs": st.one_of(st.lists(st.text(min_size=1, max_size=20), max_size=2), JSON_ANY), "error": JSON_ANY},
)
ENVELOPE = st.fixed_dictionaries(
    {"code": st.one_of(st.sampled_from([200, 400, 404, 429, 500, 1200]), JSON_LEAF), "message": st.one_of(st.text(max_size=20), JSON_LEAF)},
    optional={"data": st.one_of(DATA, JSON_ANY)},
)


@st.composite
def answers(draw) -> tuple[int, dict, bytes]:
    status = draw(st.one_of(st.sampled_from([200, 400, 403, 404, 410, 429, 500, 502, 503]), st.integers(100, 599)))
    headers = {"content-type": draw(st.sampled_from(["application/json", "text/html", "text/plain", ""]))}
    kind = draw(st.sampled_from(["envelope", "truncated", "html", "bytes", "json"]))
    if kind == "envelope":
        body = json.dumps(draw(ENVELOPE)).encode()
    elif kind == "truncated":
        whole = json.dumps(draw(ENVELOPE)).encode()
        body = whole[: draw(st.integers(0, len(whole) - 1))]
    elif kind == "html":
        body = HTML_404.encode()
    elif kind == "json":
        body = json.dumps(draw(JSON_ANY)).encode()
    else:
        body = draw(st.binary(max_size=100))
    return status, headers, body


def provider_said_the_task_is_over(status: int, headers: dict, body: bytes) -> bool:
    """The oracle, written from the rule: the provider's own JSON envelope says the task does not
    exist (code 404) or, on a 2xx, that this very task is in a final state."""
    if "html" in headers.get("content-type", "").lower():
        return False
    try:
        env = json.loads(body)
    except ValueError:
        return False
    if not isinstance(env, dict) or not isinstance(env.get("message"), str):
        return False
    code = env.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return False
    if code == 404:
        return True
    data = env.get("data")
    return (
        200 <= status < 300
        and code == 200
        and isinstance(data, dict)
        and data.get("id") == PID
        and str(data.get("status")).lower() in FINAL
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=answers())
def test_a_paid_job_is_never_ended_without_a_definitive_answer(settings, clock, answer):
    status, headers, body = answer
    provider = make_provider(settings, httpx.MockTransport(lambda request: httpx.Response(status, headers=headers, content=body)))
    deps = Deps(
        settings=settings,
        sessions=None,  # fetch_and_decide does no database work
        provider=provider,
        storage=None,
        limiter=MemoryLimiter(clock=clock.monotonic),
        breaker=MemoryBreaker(clock=clock.monotonic),
        journal=MemoryJournal(),
        fleet=MemoryFleet(clock=clock.monotonic),
        publisher=RecordingPublisher(),
        clock=clock.now,
        rng=random.Random(0),
    )
    decision = fetch_and_decide(deps, PID)  # never raises
    assert isinstance(decision, (Reschedule, Finish, Fail))
    if isinstance(decision, Fail):
        assert provider_said_the_task_is_over(status, headers, body), (status, headers, body, decision)
    if isinstance(decision, Reschedule):
        assert decision.wait > 0


# --- result polls: regressions --------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_an_html_4xx_on_a_result_poll_polls_again_instead_of_failing_the_paid_job(deps, new_job, load, fake_provider, clock, status):
    # Before: a proxy's 4xx page on the result URL failed the job, throwing the paid prediction away.
    # (A 403 also opens the breaker: systemic, never the job's end.)
    job_id = new_job()
    first = submitted(deps, job_id)
    fake_provider.script("result", httpx.Response(status, text=HTML_404, headers=HTML))
    nxt = run_poll(deps, job_id, first.poll_seq)
    assert load(job_id).state == "processing"
    assert nxt.step == "poll" and nxt.countdown >= deps.settings.poll_interval
    clock.advance(nxt.countdown)
    assert run_poll(deps, job_id, nxt.poll_seq) == Next("upload", job_id)
    assert run_upload(deps, job_id) is None
    assert load(job_id).state == "succeeded"
    assert len(fake_provider.submissions) == 1


def test_a_proxys_json_404_on_a_result_poll_is_not_the_provider_saying_the_task_is_gone(deps, new_job, load, fake_provider):
    job_id = new_job()
    first = submitted(deps, job_id)
    fake_provider.script("result", httpx.Response(404, json={"message": "no Route matched with those values"}))
    assert run_poll(deps, job_id, first.poll_seq).step == "poll"
    assert load(job_id).state == "processing"


def test_the_providers_own_404_envelope_ends_the_job(deps, new_job, load, fake_provider):
    job_id = new_job()
    first = submitted(deps, job_id)
    fake_provider.tasks.clear()  # the provider no longer knows the task: it answers its 404 envelope
    assert run_poll(deps, job_id, first.poll_seq) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "404")


def test_a_truncated_result_answer_polls_again(deps, new_job, load, fake_provider):
    job_id = new_job()
    first = submitted(deps, job_id)
    fake_provider.script(
        "result", httpx.Response(200, content=b'{"code": 200, "message": "success", "data": {"id": "pred-0001", "status": "fai')
    )
    assert run_poll(deps, job_id, first.poll_seq).step == "poll"
    assert load(job_id).state == "processing"


# --- output copies: regressions -------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_an_html_4xx_on_an_output_download_keeps_the_job_uploading_for_a_retry(deps, new_job, load, fake_provider, list_keys, status):
    # Before: a 4xx page on the output URL failed the job (a paid prediction thrown away).
    job_id = new_job()
    to_upload(deps, job_id)
    fake_provider.script("download", httpx.Response(status, text=HTML_404, headers=HTML))
    with pytest.raises(TransientProviderError):
        run_upload(deps, job_id)
    assert load(job_id).state == "uploading" and list_keys() == []
    assert run_upload(deps, job_id) is None
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png"]


def test_the_batch_pollers_inline_copy_hands_a_non_definitive_download_error_to_the_upload_task(deps, new_job, load, fake_provider):
    job_id = new_job()
    first = submitted(deps, job_id)
    task = fake_provider.finish(load(job_id).prediction_id)
    prediction = deps.provider.result(task.id)
    fake_provider.script("download", httpx.Response(404, text=HTML_404, headers=HTML))
    job = load(job_id)
    nxt = finish_inline(deps, job_id, job.poll_seq, prediction)
    assert nxt is not None and nxt.step == "upload"
    assert load(job_id).state == "uploading"
    assert first is not None


def test_the_deadline_ends_a_job_whose_outputs_never_download_and_keeps_them_for_retry(deps, new_job, load, fake_provider, clock):
    job_id = new_job(deadline_seconds=600)
    to_upload(deps, job_id)
    fake_provider.script("download", *[httpx.Response(403, text="<Error><Code>AccessDenied</Code></Error>")] * 3)
    for _ in range(3):
        with pytest.raises(TransientProviderError):
            run_upload(deps, job_id)
        assert load(job_id).state == "uploading"
    clock.advance(601)
    assert run_upload(deps, job_id) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "deadline_exceeded")
    assert job.provider_outputs  # `edit-worker retry` can still copy them


def finished_with_inline_output(deps, new_job, load, fake_provider, output: str) -> str:
    job_id = new_job(enable_base64_output=True)
    first = submitted(deps, job_id)
    task = fake_provider.finish(load(job_id).prediction_id)
    task.outputs = [output]
    assert run_poll(deps, job_id, first.poll_seq) == Next("upload", job_id)
    return job_id


def test_an_inline_output_that_is_not_an_image_fails_the_job_definitively(deps, new_job, load, fake_provider, list_keys):
    job_id = finished_with_inline_output(deps, new_job, load, fake_provider, base64.b64encode(b"<html>not an image</html>").decode())
    assert run_upload(deps, job_id) is None
    job = load(job_id)
    assert (job.state, job.error_code) == ("failed", "output_not_image")
    assert list_keys() == []


def test_an_inline_output_over_the_size_cap_fails_the_job_without_decoding_it(deps, new_job, load, fake_provider, list_keys):
    deps.settings = deps.settings.model_copy(update={"max_output_bytes": 1024})
    job_id = finished_with_inline_output(
        deps, new_job, load, fake_provider, base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 4096).decode()
    )
    assert run_upload(deps, job_id) is None
    assert (load(job_id).state, load(job_id).error_code) == ("failed", "output_too_large")
    assert list_keys() == []


def test_a_job_past_its_deadline_in_processing_is_still_failed_by_the_deadline(deps, new_job, load, fake_provider, clock):
    fake_provider.auto_outcome = None
    job_id = new_job(deadline_seconds=300)
    first = submitted(deps, job_id)
    fake_provider.script("result", *[httpx.Response(404, text=HTML_404, headers=HTML)] * 5)
    nxt = run_poll(deps, job_id, first.poll_seq)
    assert load(job_id).state == "processing"
    clock.advance(timedelta(seconds=301).total_seconds())
    assert run_poll(deps, job_id, nxt.poll_seq) is None
    assert (load(job_id).state, load(job_id).error_code) == ("failed", "deadline_exceeded")


def test_retry_of_a_job_whose_outputs_missed_the_deadline_copies_them_without_resubmitting(
    deps, new_job, load, fake_provider, clock, list_keys
):
    # Replaces the old rule's test (a CDN 404 failed the job at once): now the deadline does it.
    job_id = new_job(deadline_seconds=600)
    to_upload(deps, job_id)
    url = load(job_id).provider_outputs[0]
    fake_provider.missing_outputs.add(url)  # the CDN answers 404 (text, not the provider's word)
    with pytest.raises(TransientProviderError):
        run_upload(deps, job_id)
    clock.advance(601)
    assert run_upload(deps, job_id) is None
    failed = load(job_id)
    assert (failed.state, failed.error_code) == ("failed", "deadline_exceeded") and failed.provider_outputs == [url]

    fake_provider.missing_outputs.clear()
    job = retry_job(deps, job_id)
    assert job.state == "uploading"
    assert run_upload(deps, job_id) is None
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png"]
    assert len(fake_provider.submissions) == 1
