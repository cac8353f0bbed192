"""Properties of the webhook verifier and the URL token: for any body and any headers the answer
is a clean acceptance (the webhook id) or a WebhookVerificationError, never another exception;
only a correct, fresh signature is accepted."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from worker.adapters import webhooks
from worker.adapters.webhooks import WebhookVerificationError, job_from_url, job_token, prediction_id_of, sign, verify
from worker.errors import InvalidInput

SECRET = SecretStr("whsec_property-test-not-a-secret")
NOW = 1_800_000_000.0

# Header values as a server may hand them over: any text (latin-1 decoded bytes included).
# Lone surrogates included (what a Python caller could pass), and timestamps of any length.
header_text = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.from_regex(r"\A[0-9]{1,400}\Z"),
    st.integers(min_value=int(NOW) - 300, max_value=int(NOW) + 300).map(str),  # fresh: the checks after the clock run
    st.integers(min_value=10**308, max_value=10**400).map(str),  # past a float's range
)
header_names = st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "x-other"])
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(headers=st.dictionaries(header_names, header_text, max_size=5), body=st.binary(max_size=2000))
def test_any_headers_and_body_are_refused_cleanly(headers, body):
    try:
        accepted = verify(SECRET, headers, body, now=NOW)
    except WebhookVerificationError:
        return
    # Accidental acceptance is impossible without the secret's HMAC.
    pytest.fail(f"accepted unsigned headers {headers!r}: {accepted!r}")


@FUZZ
@given(
    headers=st.fixed_dictionaries({"webhook-id": header_text, "webhook-timestamp": header_text, "webhook-signature": header_text}),
    body=st.binary(max_size=200),
)
def test_all_three_headers_with_any_values_are_refused_cleanly(headers, body):
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers, body, now=NOW)


@FUZZ
@given(
    webhook_id=st.from_regex(r"\A[\x21-\x7e]{1,64}\Z"),
    skew=st.integers(min_value=-300, max_value=300),
    body=st.binary(max_size=2000),
    extra=st.lists(st.text(alphabet="v3,0123456789abcdef", max_size=70), max_size=3),
)
def test_a_correct_fresh_signature_is_accepted_among_any_others(webhook_id, skew, body, extra):
    timestamp = str(int(NOW) + skew)
    signature = " ".join([*extra, sign(SECRET, webhook_id, timestamp, body)])

    assert (
        verify(SECRET, {"webhook-id": webhook_id, "webhook-timestamp": timestamp, "webhook-signature": signature}, body, now=NOW)
        == webhook_id
    )


@FUZZ
@given(
    webhook_id=st.from_regex(r"\A[\x21-\x7e]{1,64}\Z"),
    body=st.binary(max_size=500),
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_a_signature_of_another_body_is_refused(webhook_id, body, flip):
    timestamp = str(int(NOW))
    signature = sign(SECRET, webhook_id, timestamp, body)
    tampered = body + b"x" if not body else body[: flip % len(body)] + bytes([body[flip % len(body)] ^ 1]) + body[flip % len(body) + 1 :]

    with pytest.raises(WebhookVerificationError):
        verify(SECRET, {"webhook-id": webhook_id, "webhook-timestamp": timestamp, "webhook-signature": signature}, tampered, now=NOW)


@FUZZ
@given(skew=st.one_of(st.integers(min_value=301, max_value=10**12), st.integers(min_value=-(10**12), max_value=-301)))
def test_a_stale_or_future_timestamp_is_refused_even_when_signed(skew):
    timestamp = str(max(0, int(NOW) + skew))
    headers = {"webhook-id": "evt-1", "webhook-timestamp": timestamp, "webhook-signature": sign(SECRET, "evt-1", timestamp, b"{}")}
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers, b"{}", now=NOW)


def test_a_huge_timestamp_is_a_refusal_not_an_overflow():
    # int("9" * 400) - float overflowed (OverflowError, a 500) before the timestamp was bounded.
    headers = {"webhook-id": "evt-1", "webhook-timestamp": "9" * 400, "webhook-signature": "v3,00"}
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers, b"{}", now=NOW)


@FUZZ
@given(query=st.dictionaries(st.sampled_from(["job_id", "token", "other"]), st.text(max_size=200), max_size=3))
def test_any_webhook_url_query_is_a_job_or_none_never_an_error(query):
    assert job_from_url(SECRET, query) in (None, query.get("job_id"))


def test_the_jobs_own_token_names_the_job():
    assert job_from_url(SECRET, {"job_id": "job-1", "token": job_token(SECRET, "job-1")}) == "job-1"
    assert job_from_url(SECRET, {"job_id": "job-1", "token": job_token(SECRET, "job-2")}) is None


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=500),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda c: st.lists(c) | st.dictionaries(st.text(max_size=5), c),
            max_leaves=20,
        ).map(lambda v: __import__("json").dumps(v).encode()),
    )
)
def test_any_signed_body_names_a_valid_prediction_id_or_is_refused_as_input(body):
    try:
        prediction_id = prediction_id_of(body)
    except InvalidInput:
        return
    assert webhooks.valid_prediction_id(prediction_id)


def test_deeply_nested_json_is_refused_as_input():
    with pytest.raises(InvalidInput):
        prediction_id_of(b"[" * 100_000 + b"]" * 100_000)


def test_verify_uses_the_real_clock_by_default():
    timestamp = str(int(time.time()))
    headers = {"webhook-id": "evt-1", "webhook-timestamp": timestamp, "webhook-signature": sign(SECRET, "evt-1", timestamp, b"{}")}
    assert verify(SECRET, headers, b"{}") == "evt-1"
