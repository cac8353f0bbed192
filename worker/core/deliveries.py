"""Callback deliveries as records: their statuses, the row a terminal transition queues (in its
own transaction, see jobs._move), and the queries and JSON the CLI and API show. Sending them is
engine/callbacks.py's business.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any, cast

from sqlalchemy import Table, select
from sqlalchemy.orm import Session, sessionmaker

from models import CallbackDelivery

DELIVERIES = cast(Table, CallbackDelivery.__table__)
# Set in a session's `info` when a transition in it queued a delivery (see callbacks_queued).
QUEUED_FLAG = "edit_worker.callbacks_queued"


class DeliveryStatus(str, Enum):
    PENDING = "pending"  # due at next_attempt_at (or being tried under a lease)
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # retries ran out (give_up_at); `redeliver` puts it back to pending

    def __str__(self) -> str:
        return self.value


def new_webhook_id() -> str:
    """A Standard Webhooks message id: unique per delivery, kept across its retries."""
    return f"msg_{uuid.uuid4().hex}"


def queued_row(job_id: Any, state: Any, url: Any, webhook_id: Any, now: Any) -> dict[str, Any]:
    """The columns of a new pending delivery, due at once (values or SQL expressions)."""
    return {
        "job_id": job_id,
        "state": state,
        "url": url,
        "webhook_id": webhook_id,
        "status": DeliveryStatus.PENDING.value,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


def callbacks_queued(session: Session) -> bool:
    """Whether a transition made in `session` queued a callback delivery (and forget it): the
    caller, once it has committed, wakes the delivery loop."""
    return bool(session.info.pop(QUEUED_FLAG, False))


def list_deliveries(sessions: sessionmaker[Session], job_id: str) -> list[CallbackDelivery]:
    """A job's deliveries, oldest first (one per terminal transition: a retried job has several)."""
    with sessions() as session:
        return list(session.scalars(select(CallbackDelivery).where(CallbackDelivery.job_id == job_id).order_by(CallbackDelivery.id)))


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if value else None


def delivery_json(delivery: CallbackDelivery) -> dict[str, Any]:
    """A delivery as the CLI and HTTP API show it (no payload, no secret)."""
    return {
        "id": delivery.id,
        "job_id": delivery.job_id,
        "event": delivery.state,
        "url": delivery.url,
        "webhook_id": delivery.webhook_id,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": _iso(delivery.next_attempt_at) if delivery.status == DeliveryStatus.PENDING.value else None,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": _iso(delivery.created_at),
        "last_attempt_at": _iso(delivery.last_attempt_at),
        "delivered_at": _iso(delivery.delivered_at),
    }
