"""WaveSpeed webhooks on the wire: signing and verifying (signature, freshness), the per-job
webhook URL and its token, and reading the prediction id out of a body. What a webhook then does
to a job is the engine's business (engine/webhooks.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from pydantic import SecretStr

from worker.adapters.callback_signing import SECRET_PREFIX, TOLERANCE_SECONDS, WebhookVerificationError
from worker.adapters.wavespeed import valid_prediction_id
from worker.errors import InvalidInput

log = logging.getLogger(__name__)

SIGNATURE_VERSION = "v3"
# A delivered webhook id is remembered this long: a replay is refused while its timestamp could
# still pass the freshness check (sent up to TOLERANCE_SECONDS ahead of our clock, or behind it).
REPLAY_WINDOW_SECONDS = 2 * TOLERANCE_SECONDS + 60


def webhook_secret(settings: Any) -> SecretStr | None:
    """The configured webhook secret (WAVESPEED_WEBHOOK_SECRET), or None: then the endpoint is off."""
    value = settings.webhook_secret
    raw = (value.get_secret_value() if isinstance(value, SecretStr) else (value or "")).strip()
    return SecretStr(raw) if raw else None


def _hmac_key(secret: SecretStr) -> bytes:
    # The provider's rule: drop the `whsec_` prefix and use the rest as is (no base64 decoding).
    raw = secret.get_secret_value()
    if raw.startswith(SECRET_PREFIX):
        raw = raw[len(SECRET_PREFIX) :]
    return raw.encode("utf-8")


def sign(secret: SecretStr, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The `webhook-signature` header value the provider sends for this request."""
    message = f"{webhook_id}.{timestamp}.".encode() + body
    return f"{SIGNATURE_VERSION},{hmac.new(_hmac_key(secret), message, hashlib.sha256).hexdigest()}"


# What the headers may hold: the provider sends ASCII ids, a Unix timestamp and `v3,<hex>`
# signatures. Anything else is refused before any arithmetic or hashing touches it.
_WEBHOOK_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"\s*[0-9]{1,12}\s*")
MAX_SIGNATURE_HEADER = 4096


def verify(
    secret: SecretStr,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE_SECONDS,
) -> str:
    """The webhook's id, if the headers carry a valid, fresh signature of `body`; else
    WebhookVerificationError (any headers, any body: a clean refusal, never another exception)."""
    webhook_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signature = headers.get("webhook-signature")
    if not webhook_id or not timestamp or not signature:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not isinstance(webhook_id, str) or not _WEBHOOK_ID.fullmatch(webhook_id):
        raise WebhookVerificationError("webhook-id is not 1..256 printable ASCII characters")
    if not isinstance(timestamp, str) or not _TIMESTAMP.fullmatch(timestamp):
        raise WebhookVerificationError("webhook-timestamp is not a Unix timestamp")
    if not isinstance(signature, str) or len(signature) > MAX_SIGNATURE_HEADER or not signature.isascii():
        raise WebhookVerificationError("webhook-signature is not a list of v3,<hex> signatures")
    if not isinstance(body, (bytes, bytearray)):
        raise WebhookVerificationError("webhook body is not bytes")
    sent_at = int(timestamp.strip())
    now = time.time() if now is None else now
    if abs(now - sent_at) > tolerance:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance:g}s away from now")
    expected = sign(secret, webhook_id, timestamp, bytes(body)).split(",", 1)[1].encode()
    # The header may list several signatures (key rotation), space separated: any valid one will do.
    # Every candidate is compared in constant time so no timing hints leak about the expected value.
    matched = False
    for candidate in signature.split()[:16]:
        version, _, value = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value.strip().lower().encode("ascii"), expected):
            matched = True
    if not matched:
        raise WebhookVerificationError("webhook signature does not match")
    return webhook_id


def prediction_id_of(body: bytes) -> str:
    """The prediction id a webhook body names: a prediction object, bare or inside the `data`
    envelope, and one the WaveSpeed client would put in a URL path."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidInput("webhook body is not JSON") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), dict) and payload["data"].get("id"):
        payload = payload["data"]
    if (
        not isinstance(payload, dict)
        or not payload.get("id")
        or not isinstance(payload["id"], (str, int))
        or isinstance(payload["id"], bool)
    ):
        raise InvalidInput("webhook body names no prediction id")
    prediction_id = str(payload["id"])
    if not valid_prediction_id(prediction_id):
        raise InvalidInput("webhook body names a prediction id of an unexpected form")
    return prediction_id


def job_token(secret: SecretStr, job_id: str) -> str:
    """A per-job tag for the webhook URL: only we (holding the secret) can make it, so a webhook
    that arrives on a job's URL with a valid token was requested by that job's submit."""
    return hmac.new(_hmac_key(secret), f"job:{job_id}".encode(), hashlib.sha256).hexdigest()[:32]


def job_webhook_url(base_url: str, secret: SecretStr, job_id: str) -> str:
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}{urlencode({'job_id': job_id, 'token': job_token(secret, job_id)})}"


def job_from_url(secret: SecretStr, query: Mapping[str, str]) -> str | None:
    """The job a webhook URL names, if its token is ours (any other text: None, never an error)."""
    job_id, token = query.get("job_id"), query.get("token")
    if not job_id or not token or len(job_id) > 64 or not job_id.isascii():
        return None
    # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a refusal).
    if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), job_token(secret, job_id).encode("ascii")):
        return None
    return job_id
