"""Specification of callback delivery: a job that ends (failed, cancelled, succeeded) with a
callback_url is POSTed to it, signed (Standard Webhooks), retried with backoff on any failure for
the retry window and then failed; never redirected; refused on a private address at delivery
time; read capped; and redeliverable by the operator under the same webhook-id."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
import standardwebhooks
from pydantic import SecretStr
from sqlalchemy import update

from models import CallbackDelivery, Job
from worker.core import jobs
from worker.core.deliveries import list_deliveries
from worker.core.states import State
from worker.core.steps import Step
from worker.engine import callbacks
from worker.engine.bookkeeping import fail_job
from worker.engine.operator import cancel_job
from worker.errors import DeliveryNotFound, InvalidJobOperation, JobNotFound

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
HOOK = "https://producer.example.com/hooks/edits"
PUBLIC = ["93.184.216.34"]


class Receiver:
    """A producer's endpoint behind httpx.MockTransport: answers each request with the next
    scripted action (a status code, a Response, or an exception to raise), then 200."""

    def __init__(self, *script):
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        action = self.script.pop(0) if self.script else 200
        if isinstance(action, BaseException):
            raise action
        if isinstance(action, httpx.Response):
            return action
        return httpx.Response(action, text="ok")


@pytest.fixture
def cb_deps(deps):
    settings = deps.settings.model_copy(
        update={
            "callback_secret": SecretStr(SECRET),
            "callback_backoff_base": 5.0,
            "callback_backoff_max": 3600.0,
            "callback_retry_seconds": 86400.0,
            "callback_batch_size": 10,
        }
    )
    return dataclasses.replace(deps, settings=settings)


@pytest.fixture
def hooked_job(sessions, new_job):
    def make(url: str = HOOK) -> str:
        job_id = new_job()
        with sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(callback_url=url))
            session.commit()
        return job_id

    return make


def run(deps, receiver, *, resolver=lambda host: PUBLIC):
    client = httpx.Client(transport=httpx.MockTransport(receiver), follow_redirects=False)
    with ThreadPoolExecutor(4) as pool:
        return callbacks.deliver_due(deps, client=client, resolver=resolver, executor=pool)


def delivery(sessions, job_id: str) -> CallbackDelivery:
    [row] = list_deliveries(sessions, job_id)
    return row


def fail(deps, job_id):
    fail_job(deps, job_id, State.QUEUED, "test", "rejected", "the provider refused the job")


def test_a_failed_job_is_posted_signed_to_its_callback_url(cb_deps, sessions, hooked_job, publisher, clock):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    assert (Step.DELIVER_CALLBACKS, None, 0.0, None) in publisher.sent  # the loop was woken at once
    receiver = Receiver()
    report = run(cb_deps, receiver)
    assert (report.claimed, report.delivered) == (1, 1)
    [request] = receiver.requests
    assert request.method == "POST" and str(request.url) == HOOK
    body = json.loads(standardwebhooks.Webhook(SECRET).verify(request.content, dict(request.headers)) and request.content)
    assert body == jobs.to_json(jobs.get_job(sessions, job_id))
    assert body["state"] == "failed" and body["error"]["code"] == "rejected"
    row = delivery(sessions, job_id)
    assert (row.status, row.attempts, row.last_status_code, row.delivered_at) == ("delivered", 1, 200, clock.now())
    assert request.headers["webhook-id"] == row.webhook_id
    assert run(cb_deps, Receiver()).claimed == 0  # delivered once, not again


def test_a_cancelled_job_is_delivered_too(cb_deps, sessions, hooked_job):
    job_id = hooked_job()
    cancel_job(cb_deps, job_id)
    receiver = Receiver()
    run(cb_deps, receiver)
    assert json.loads(receiver.requests[0].content)["state"] == "cancelled"


def test_a_succeeded_job_is_delivered_with_its_outputs(cb_deps, sessions, hooked_job, drive, publisher):
    job_id = hooked_job()
    drive(job_id)
    assert jobs.get_job(sessions, job_id).state == "succeeded"
    assert (Step.DELIVER_CALLBACKS, None, 0.0, None) in publisher.sent  # woken by the copier's transition
    receiver = Receiver()
    run(cb_deps, receiver)
    body = json.loads(receiver.requests[0].content)
    assert body["state"] == "succeeded" and body["outputs"] and body["outputs"][0].startswith("s3://")


def test_no_job_without_a_callback_url_is_posted_or_wakes_the_loop(cb_deps, new_job, publisher):
    fail(cb_deps, new_job())
    assert all(step != Step.DELIVER_CALLBACKS for step, *_ in publisher.sent)
    receiver = Receiver()
    assert run(cb_deps, receiver).claimed == 0 and receiver.requests == []


@pytest.mark.parametrize(
    "answer, error",
    [
        (500, "HTTP 500"),
        (404, "HTTP 404"),
        (httpx.ReadTimeout("slow"), "timed out"),
        (httpx.ConnectError("refused"), "not reached (ConnectError)"),
    ],
)
def test_a_failed_try_is_retried_later_with_the_same_webhook_id(cb_deps, sessions, hooked_job, clock, answer, error):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    receiver = Receiver(answer)
    assert run(cb_deps, receiver).retried == 1
    row = delivery(sessions, job_id)
    assert (row.status, row.attempts, row.last_error) == ("pending", 1, error)
    wait = (row.next_attempt_at - clock.now()).total_seconds()
    assert 2.5 <= wait <= 5.0  # first retry: base 5 s, jittered to [half, full]
    assert run(cb_deps, receiver).claimed == 0  # not due yet
    clock.advance(wait)
    assert run(cb_deps, receiver).delivered == 1
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == row.webhook_id
    assert first.content == second.content
    assert delivery(sessions, job_id).status == "delivered"


def test_retry_delays_grow_exponentially_with_jitter_up_to_the_cap():
    rng = random.Random(1)
    for tries, ceiling in [(1, 5), (2, 10), (3, 20), (4, 40), (10, 2560), (11, 3600), (30, 3600)]:
        delays = [callbacks.retry_delay(tries, base=5, maximum=3600, rng=rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 10  # really jittered
    assert callbacks.retry_delay(1, base=5, maximum=3600, rng=rng, retry_after=120) >= 120
    assert callbacks.retry_delay(1, base=5, maximum=60, rng=rng, retry_after=10_000) <= 60


def test_a_receiver_that_never_answers_2xx_is_given_up_after_the_retry_window(cb_deps, sessions, hooked_job, clock):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    created = delivery(sessions, job_id).created_at
    receiver = Receiver(*([503] * 1000))
    while delivery(sessions, job_id).status == "pending":
        run(cb_deps, receiver)
        row = delivery(sessions, job_id)
        if row.status == "pending":
            assert row.next_attempt_at <= created + timedelta(hours=24)
            clock.advance((row.next_attempt_at - clock.now()).total_seconds())
    row = delivery(sessions, job_id)
    assert row.status == "failed" and row.last_status_code == 503 and row.next_attempt_at is None
    assert clock.now() == created + timedelta(hours=24)  # the last try falls on the deadline itself
    assert 20 <= len(receiver.requests) == row.attempts <= 60  # exponential: dozens of tries, not thousands
    assert callbacks.next_due_in(cb_deps) is None


def test_a_redirect_is_not_followed_and_counts_as_a_failed_try(cb_deps, sessions, hooked_job):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    receiver = Receiver(httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"}))
    run(cb_deps, receiver)
    assert len(receiver.requests) == 1  # the Location was never requested
    row = delivery(sessions, job_id)
    assert (row.status, row.last_status_code) == ("pending", 302) and "redirect" in row.last_error


def test_the_shared_client_does_not_follow_redirects(cb_deps):
    client = callbacks.make_client(cb_deps.settings)
    assert client.follow_redirects is False
    assert client.timeout.connect <= 5.0 and client.timeout.read == cb_deps.settings.callback_timeout


def test_a_callback_host_that_now_resolves_to_a_private_address_is_refused(cb_deps, sessions, hooked_job, clock):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    receiver = Receiver()
    run(cb_deps, receiver, resolver=lambda host: ["10.0.0.7"])  # DNS changed since the job was created
    assert receiver.requests == []
    row = delivery(sessions, job_id)
    assert row.status == "pending" and "resolves to a private address" in row.last_error and "10.0.0.7" not in row.last_error
    clock.advance(10)
    run(cb_deps, receiver, resolver=lambda host: PUBLIC)  # and back: delivered
    assert len(receiver.requests) == 1 and delivery(sessions, job_id).status == "delivered"


def test_private_callback_urls_are_allowed_when_the_operator_allows_private_urls(cb_deps, sessions, hooked_job):
    deps = dataclasses.replace(cb_deps, settings=cb_deps.settings.model_copy(update={"allow_private_urls": True}))
    job_id = hooked_job("http://127.0.0.1:9/hook")
    fail(deps, job_id)
    receiver = Receiver()
    run(deps, receiver, resolver=lambda host: ["127.0.0.1"])
    assert len(receiver.requests) == 1 and delivery(sessions, job_id).status == "delivered"


def test_a_large_answer_is_read_capped(cb_deps, sessions, hooked_job):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    served = []

    def endless():
        while True:
            served.append(1)
            yield b"x" * 1024

    receiver = Receiver(httpx.Response(200, stream=_Stream(endless())))
    run(cb_deps, receiver)
    assert delivery(sessions, job_id).status == "delivered"
    assert len(served) <= callbacks.MAX_RESPONSE_BYTES // 1024 + 1


class _Stream(httpx.SyncByteStream):
    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks


def test_without_a_secret_nothing_is_sent_unsigned(deps, sessions, hooked_job):
    job_id = hooked_job()
    fail(deps, job_id)
    receiver = Receiver()
    run(deps, receiver)
    assert receiver.requests == []
    assert "no callback secret" in delivery(sessions, job_id).last_error


def test_a_sender_whose_lease_ran_out_records_nothing_over_the_new_claim(cb_deps, sessions, hooked_job, clock):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    [stale] = callbacks.claim_due(cb_deps, 10)
    clock.advance(callbacks._lease_seconds(cb_deps) + 1)
    [fresh] = callbacks.claim_due(cb_deps, 10)  # the first sender looked dead: another claims it
    assert fresh.attempt == stale.attempt + 1 and fresh.webhook_id == stale.webhook_id and fresh.body == stale.body
    callbacks.record(cb_deps, [(stale, callbacks.Outcome(False, 500, "HTTP 500"))])
    assert delivery(sessions, job_id).last_error is None  # the stale outcome was not written
    callbacks.record(cb_deps, [(fresh, callbacks.Outcome(True, 204))])
    assert delivery(sessions, job_id).status == "delivered"


def test_the_body_is_fixed_at_the_first_try(cb_deps, sessions, hooked_job, clock):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    receiver = Receiver(500)
    run(cb_deps, receiver)
    with sessions() as session:  # the job changes after the first try (e.g. an operator's note)
        session.execute(update(Job).where(Job.id == job_id).values(error_message="changed later"))
        session.commit()
    clock.advance(3600)
    run(cb_deps, receiver)
    first, second = receiver.requests
    assert first.content == second.content and b"changed later" not in second.content


def test_redeliver_sends_a_failed_delivery_again_under_the_same_webhook_id(cb_deps, sessions, hooked_job, clock, publisher):
    job_id = hooked_job()
    fail(cb_deps, job_id)
    with sessions() as session:
        session.execute(update(CallbackDelivery).values(status="failed", next_attempt_at=None))
        session.commit()
    before = delivery(sessions, job_id)
    publisher.sent.clear()
    clock.advance(48 * 3600)  # long after the retry window closed
    again = callbacks.redeliver(cb_deps, delivery_id=before.id)
    assert (again.status, again.next_attempt_at, again.webhook_id) == ("pending", clock.now(), before.webhook_id)
    assert again.give_up_at == clock.now() + timedelta(hours=24)  # a fresh window
    assert (Step.DELIVER_CALLBACKS, None, 0.0, None) in publisher.sent
    receiver = Receiver()
    run(cb_deps, receiver)
    assert receiver.requests[0].headers["webhook-id"] == before.webhook_id
    assert delivery(sessions, job_id).status == "delivered"
    # A delivered one can be sent again too (the receiver lost it), by job id.
    assert callbacks.redeliver(cb_deps, job_id=job_id).status == "pending"
    run(cb_deps, receiver)
    assert len(receiver.requests) == 2 and receiver.requests[1].headers["webhook-id"] == before.webhook_id


def test_redeliver_refuses_unknown_ids_and_jobs_without_deliveries(cb_deps, new_job):
    with pytest.raises(DeliveryNotFound):
        callbacks.redeliver(cb_deps, delivery_id=12345)
    with pytest.raises(JobNotFound):
        callbacks.redeliver(cb_deps, job_id="no-such-job")
    with pytest.raises(InvalidJobOperation):
        callbacks.redeliver(cb_deps, job_id=new_job())


def test_redeliver_failed_puts_back_every_failed_delivery_since(cb_deps, sessions, hooked_job, clock):
    old, recent, fine = hooked_job(), hooked_job(), hooked_job()
    fail(cb_deps, old)
    clock.advance(3600)
    fail(cb_deps, recent)
    fail(cb_deps, fine)
    with sessions() as session:
        session.execute(update(CallbackDelivery).where(CallbackDelivery.job_id != fine).values(status="failed", next_attempt_at=None))
        session.commit()
    assert callbacks.redeliver_failed(cb_deps, since=clock.now() - timedelta(minutes=5)) == 1
    assert [delivery(sessions, j).status for j in (old, recent, fine)] == ["failed", "pending", "pending"]
    assert callbacks.redeliver_failed(cb_deps) == 1
    assert delivery(sessions, old).status == "pending"


def test_a_pass_delivers_many_concurrently_and_reports_what_is_due_next(cb_deps, sessions, hooked_job, clock):
    ids = [hooked_job() for _ in range(25)]
    for job_id in ids:
        fail(cb_deps, job_id)
    receiver = Receiver(*([500] * 5))
    report = run(cb_deps, receiver)
    assert (report.claimed, report.delivered, report.retried) == (25, 20, 5)
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 25
    assert 2.5 <= report.next_due_in <= 5.0


def test_webhook_timestamps_come_from_the_clock(cb_deps, hooked_job):
    fail(cb_deps, hooked_job())
    receiver = Receiver()
    run(cb_deps, receiver)
    assert abs(int(receiver.requests[0].headers["webhook-timestamp"]) - time.time()) < 60
