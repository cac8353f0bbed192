"""WaveSpeed webhooks on the wire: signing and verifying (signature, freshness), the per-job
webhook URL and its token, and reading the prediction id out of a body. What a webhook then does
to a job is the engine's business (engine/webhooks.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from pydantic import SecretStr

# The header names, the `whsec_` prefix, the replay window (the provider's WebhookMaxAgeSeconds,
# applied both ways for clock skew) and the freshness check are Standard Webhooks', shared with
# our own callbacks; the provider's v3 signature (hex, raw key) is its own.
from worker.adapters.callback_signing import SECRET_PREFIX, TOLERANCE_SECONDS, WebhookVerificationError, read_headers
from worker.errors import InvalidInput

log = logging.getLogger(__name__)

SIGNATURE_VERSION = "v3"


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


def verify(
    secret: SecretStr,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE_SECONDS,
) -> None:
    """Raise WebhookVerificationError unless the headers carry a valid, fresh signature of `body`."""
    webhook_id, timestamp, signature = read_headers(headers, now=now, tolerance=tolerance)
    expected = sign(secret, webhook_id, timestamp, body).split(",", 1)[1]
    # The header may list several signatures (key rotation), space separated: any valid one will do.
    # Every candidate is compared in constant time so no timing hints leak about the expected value.
    matched = False
    for candidate in signature.split():
        version, _, value = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value.strip().lower().encode(), expected.encode()):
            matched = True
    if not matched:
        raise WebhookVerificationError("webhook signature does not match")


def prediction_id_of(body: bytes) -> str:
    """The prediction id a webhook body names: a prediction object, bare or inside the `data` envelope."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("webhook body is not JSON") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), dict) and payload["data"].get("id"):
        payload = payload["data"]
    if not isinstance(payload, dict) or not payload.get("id") or not isinstance(payload["id"], (str, int)):
        raise InvalidInput("webhook body names no prediction id")
    return str(payload["id"])


def job_token(secret: SecretStr, job_id: str) -> str:
    """A per-job tag for the webhook URL: only we (holding the secret) can make it, so a webhook
    that arrives on a job's URL with a valid token was requested by that job's submit."""
    return hmac.new(_hmac_key(secret), f"job:{job_id}".encode(), hashlib.sha256).hexdigest()[:32]


def job_webhook_url(base_url: str, secret: SecretStr, job_id: str) -> str:
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}{urlencode({'job_id': job_id, 'token': job_token(secret, job_id)})}"


def job_from_url(secret: SecretStr, query: Mapping[str, str]) -> str | None:
    """The job a webhook URL names, if its token is ours."""
    job_id, token = query.get("job_id"), query.get("token")
    if not job_id or not token or not hmac.compare_digest(token, job_token(secret, job_id)):
        return None
    return job_id
