"""Specification of callback signing: Standard Webhooks v1, checked against the independent
reference package (`standardwebhooks`) both ways; secrets never shown."""

from __future__ import annotations

import base64
import json
import time

import pytest
import standardwebhooks
from pydantic import SecretStr

from worker.adapters import callback_signing as cs

SECRET = SecretStr("whsec_" + base64.b64encode(b"k" * 32).decode())
BODY = json.dumps({"id": "job-1", "state": "succeeded"}, separators=(",", ":")).encode()


def test_our_signature_verifies_with_the_reference_package():
    now = int(time.time())
    headers = cs.signed_headers(SECRET, "msg_abc", now, BODY)
    assert headers["webhook-signature"].startswith("v1,")
    assert standardwebhooks.Webhook(SECRET.get_secret_value()).verify(BODY, headers) == json.loads(BODY)


def test_a_fresh_secret_works_with_the_reference_package():
    secret = cs.new_secret()
    assert secret.get_secret_value().startswith("whsec_") and len(cs.signing_key(secret)) == 32
    headers = cs.signed_headers(secret, "msg_new", int(time.time()), BODY)
    standardwebhooks.Webhook(secret.get_secret_value()).verify(BODY, headers)


def test_we_verify_what_the_reference_package_signs():
    now = int(time.time())
    reference = standardwebhooks.Webhook(SECRET.get_secret_value())
    from datetime import datetime, timezone

    signature = reference.sign("msg_ref", datetime.fromtimestamp(now, tz=timezone.utc), BODY.decode())
    headers = {"webhook-id": "msg_ref", "webhook-timestamp": str(now), "webhook-signature": signature}
    assert cs.verify(SECRET, headers, BODY) == "msg_ref"


def test_signature_matches_the_spec_formula():
    # v1,base64(HMAC-SHA256(base64decode(secret without whsec_), "id.timestamp.body"))
    import hashlib
    import hmac

    expected = base64.b64encode(hmac.new(b"k" * 32, b"msg_1.1700000000." + BODY, hashlib.sha256).digest()).decode()
    assert cs.sign(SECRET, "msg_1", 1700000000, BODY) == f"v1,{expected}"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),  # body changed
        lambda h, b: ({**h, "webhook-id": "msg_other"}, b),  # id changed
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),  # timestamp changed
    ],
)
def test_a_tampered_message_is_refused_by_both(tamper):
    headers, body = tamper(cs.signed_headers(SECRET, "msg_abc", int(time.time()), BODY), BODY)
    with pytest.raises(cs.WebhookVerificationError):
        cs.verify(SECRET, headers, body)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET.get_secret_value()).verify(body, headers)


def test_another_secret_or_a_stale_timestamp_is_refused():
    headers = cs.signed_headers(SECRET, "msg_abc", int(time.time()), BODY)
    with pytest.raises(cs.WebhookVerificationError):
        cs.verify(cs.new_secret(), headers, BODY)
    old = cs.signed_headers(SECRET, "msg_abc", int(time.time()) - 3600, BODY)
    with pytest.raises(cs.WebhookVerificationError, match="away from now"):
        cs.verify(SECRET, old, BODY)


def test_a_malformed_secret_is_refused_without_showing_it():
    bad = SecretStr("whsec_not*base64!")
    with pytest.raises(cs.InvalidSigningSecret) as caught:
        cs.sign(bad, "msg", 1, BODY)
    assert "not*base64" not in str(caught.value)
    with pytest.raises(cs.InvalidSigningSecret):
        cs.signing_key(SecretStr("whsec_"))
