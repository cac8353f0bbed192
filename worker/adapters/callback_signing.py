"""Standard Webhooks on the wire (https://www.standardwebhooks.com): signing our callbacks to
producers and verifying them (`v1,<base64 HMAC-SHA256>` keyed by the base64 secret after `whsec_`),
plus the header reading and freshness check that the provider's own scheme (webhooks.py) shares.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

from pydantic import SecretStr

from worker.errors import EditWorkerError

SIGNATURE_VERSION = "v1"
SECRET_PREFIX = "whsec_"
# Receivers reject timestamps further than this from their clock (both ways, for skew).
TOLERANCE_SECONDS = 300
SECRET_BYTES = 32


class WebhookVerificationError(EditWorkerError):
    """The request is not a fresh webhook signed with our secret (messages never carry the secret)."""


class InvalidSigningSecret(EditWorkerError, ValueError):
    """A callback secret that is not `whsec_<base64>` (the message never shows the value)."""


def new_secret() -> SecretStr:
    """A fresh signing secret in the Standard Webhooks form `whsec_<base64 of 32 random bytes>`."""
    return SecretStr(SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii"))


def signing_key(secret: SecretStr) -> bytes:
    """The HMAC key: the base64 after the `whsec_` prefix, decoded."""
    raw = secret.get_secret_value().strip()
    if raw.startswith(SECRET_PREFIX):
        raw = raw[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSigningSecret("the callback secret is not whsec_<base64>") from None
    if not key:
        raise InvalidSigningSecret("the callback secret is empty")
    return key


def sign(secret: SecretStr, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for this message: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`."""
    message = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), message, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signed_headers(secret: SecretStr, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one try of a message."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": sign(secret, webhook_id, int(timestamp), body),
    }


def read_headers(headers: Mapping[str, str], *, now: float | None = None, tolerance: float = TOLERANCE_SECONDS) -> tuple[str, str, str]:
    """(webhook-id, webhook-timestamp, webhook-signature) of a request whose timestamp is within
    `tolerance` of now; WebhookVerificationError otherwise. Shared by both signature schemes."""
    webhook_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signature = headers.get("webhook-signature")
    if not webhook_id or not timestamp or not signature:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        sent_at = int(timestamp.strip())
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a Unix timestamp") from None
    now = time.time() if now is None else now
    if abs(now - sent_at) > tolerance:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance:g}s away from now")
    return webhook_id, timestamp, signature


def verify(
    secret: SecretStr, headers: Mapping[str, str], body: bytes, *, now: float | None = None, tolerance: float = TOLERANCE_SECONDS
) -> str:
    """The webhook-id of a fresh message validly signed with `secret`; WebhookVerificationError
    otherwise. (What a producer's receiver does; the tests check it against the reference package.)"""
    webhook_id, timestamp, signature = read_headers(headers, now=now, tolerance=tolerance)
    expected = sign(secret, webhook_id, int(timestamp), body).split(",", 1)[1].encode()
    matched = False
    # Several space-separated signatures (key rotation): any valid one will do; each compared in
    # constant time.
    for candidate in signature.split():
        version, _, value = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value.strip().encode(), expected):
            matched = True
    if not matched:
        raise WebhookVerificationError("webhook signature does not match")
    return webhook_id
