"""Tenants and API keys: who is calling, what they may see, and their quotas at admission.

A key is shown once (`edit-worker keys create`); only its SHA-256 is stored, so a leaked database
yields no usable key. Keys carry high entropy (32 random bytes), so a plain hash is the right tool
(a slow password hash buys nothing and costs every request).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from pydantic import SecretStr
from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from models import ApiKey, Job, Tenant
from worker.core.jobs import Clock, utcnow
from worker.core.states import State
from worker.core.validation import DEFAULT_TENANT, PRIORITIES, validate_priority, validate_tenant
from worker.errors import InvalidInput, QuotaExceeded

__all__ = ["DEFAULT_TENANT", "PRIORITIES", "validate_priority", "validate_tenant"]

KEY_PREFIX = "ewk_"


@dataclass(frozen=True)
class Caller:
    """Who made a request: a tenant's key, or an admin key (sees every tenant)."""

    tenant: str
    admin: bool = False
    key_id: str | None = None

    @property
    def scope(self) -> str | None:
        """The tenant every query is limited to; None for an admin (all tenants)."""
        return None if self.admin else self.tenant


@dataclass(frozen=True)
class NewKey:
    """A key just created: the only moment its plain text exists."""

    key_id: str
    tenant: str
    key: SecretStr
    webhook_secret: SecretStr
    admin: bool


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def ensure_tenant(session: Session, name: str, *, clock: Clock = utcnow) -> Tenant:
    """The tenant row, created (with a fresh callback signing secret) on first use."""
    tenant = session.get(Tenant, name)
    if tenant is None:
        tenant = Tenant(name=name, webhook_secret=_new_webhook_secret(), weight=1, created_at=clock())
        session.add(tenant)
        try:
            session.flush()
        except IntegrityError:  # created concurrently
            session.rollback()
            tenant = session.get(Tenant, name)
            assert tenant is not None
    return tenant


def create_key(sessions: sessionmaker[Session], tenant: str, *, admin: bool = False, clock: Clock = utcnow) -> NewKey:
    """A new API key for `tenant` (the tenant is created if needed)."""
    tenant = validate_tenant(tenant)
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    with sessions() as session:
        row = ensure_tenant(session, tenant, clock=clock)
        session.add(ApiKey(id=key_id, tenant=tenant, key_hash=_hash(key), admin=admin, created_at=clock()))
        session.commit()
        secret = row.webhook_secret
    return NewKey(key_id=key_id, tenant=tenant, key=SecretStr(key), webhook_secret=SecretStr(secret), admin=admin)


def list_keys(sessions: sessionmaker[Session], *, tenant: str | None = None) -> list[ApiKey]:
    with sessions() as session:
        query = select(ApiKey).order_by(ApiKey.tenant, ApiKey.created_at)
        if tenant is not None:
            query = query.where(ApiKey.tenant == tenant)
        return list(session.scalars(query))


def revoke_key(sessions: sessionmaker[Session], key_id: str, *, clock: Clock = utcnow) -> bool:
    """Revoke a key by its id (or the whole key); False if no such live key."""
    key_id = key_id.strip()
    if key_id.startswith(KEY_PREFIX):
        key_id = key_id[len(KEY_PREFIX) :].split("_", 1)[0]
    with sessions() as session:
        done = cast(
            CursorResult, session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=clock()))
        )
        session.commit()
        return done.rowcount == 1


def authenticate(sessions: sessionmaker[Session], token: str | None) -> Caller | None:
    """The caller a bearer token belongs to; None for a missing, unknown or revoked key."""
    if not token or not token.startswith(KEY_PREFIX) or len(token) > 200:
        return None
    with sessions() as session:
        row = session.execute(
            select(ApiKey.id, ApiKey.tenant, ApiKey.admin, ApiKey.revoked_at).where(ApiKey.key_hash == _hash(token))
        ).first()
    if row is None or row.revoked_at is not None:
        return None
    return Caller(tenant=row.tenant, admin=bool(row.admin), key_id=row.id)


def webhook_secret(sessions: sessionmaker[Session], tenant: str) -> SecretStr | None:
    """The secret that signs `tenant`'s completion callbacks (None: the tenant has none yet)."""
    with sessions() as session:
        value = session.scalar(select(Tenant.webhook_secret).where(Tenant.name == tenant))
    return SecretStr(value) if value else None


def list_tenants(sessions: sessionmaker[Session]) -> list[Tenant]:
    with sessions() as session:
        return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def set_tenant(
    sessions: sessionmaker[Session],
    name: str,
    *,
    weight: int | None = None,
    rate_per_minute: int | None = None,
    max_in_flight: int | None = None,
    daily_budget: int | None = None,
    callback_url: str | None = None,
    clock: Clock = utcnow,
) -> Tenant:
    """Create or change a tenant's weight, quotas and default callback URL (None leaves a value as
    it is; an empty callback URL removes it). The URL must already be checked (validate_callback_url)."""
    name = validate_tenant(name)
    for label, value in (("weight", weight), ("rate", rate_per_minute), ("max in flight", max_in_flight), ("daily budget", daily_budget)):
        if value is not None and (value < 0 or (label == "weight" and value < 1)):
            raise InvalidInput(f"{label} must be {'>= 1' if label == 'weight' else '>= 0'}")
    with sessions() as session:
        tenant = ensure_tenant(session, name, clock=clock)
        for field, value in (
            ("weight", weight),
            ("rate_per_minute", rate_per_minute),
            ("max_in_flight", max_in_flight),
            ("daily_budget", daily_budget),
        ):
            if value is not None:
                setattr(tenant, field, value)
        if callback_url is not None:
            tenant.callback_url = callback_url or None
        session.commit()
        return tenant


@dataclass(frozen=True)
class Quotas:
    """A tenant's effective quotas (0 = no limit)."""

    rate_per_minute: int = 0
    max_in_flight: int = 0
    daily_budget: int = 0


def quotas_of(row: Tenant | None, settings) -> Quotas:
    """A tenant's effective quotas: its own values where set, else the deployment's defaults
    (EDIT_WORKER_TENANT_*); `row` None: a tenant without a row (only the defaults apply)."""

    def pick(own: int | None, default: int) -> int:
        return default if own is None else own

    return Quotas(
        rate_per_minute=pick(row.rate_per_minute if row else None, settings.tenant_rate_per_minute),
        max_in_flight=pick(row.max_in_flight if row else None, settings.tenant_max_in_flight),
        daily_budget=pick(row.daily_budget if row else None, settings.tenant_daily_budget),
    )


def quotas_for(session: Session, tenant: str, settings) -> Quotas:
    return quotas_of(session.get(Tenant, tenant), settings)


def _day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def paid_today(session: Session, tenant: str, now: datetime) -> int:
    """Jobs admitted today (UTC) that were or will be paid for: every job admitted today except
    those that ended without a paid submission (refused, cancelled before submit)."""
    unpaid_end = Job.state.in_([State.FAILED.value, State.CANCELLED.value]) & (Job.paid_submissions == 0)
    return int(
        session.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.created_at >= _day_start(now), ~unpaid_end))
        or 0
    )


def check_admission(sessions: sessionmaker[Session], tenant: str, count: int, settings, *, clock: Clock = utcnow) -> None:
    """Refuse `count` new jobs for `tenant` over its rate or its daily budget (QuotaExceeded with
    the seconds until it may try again). Counted in SQL, so every API process and producer shares
    the same numbers; concurrent admissions may overshoot by the jobs admitted in the same instant."""
    with sessions() as session:
        check_admission_in(session, tenant, session.get(Tenant, tenant), count, settings, clock())


def tenant_rows(session: Session, names: set[str]) -> dict[str, Tenant]:
    """The rows of the tenants among `names` that have one (one query): admission reads each
    tenant's quotas and default callback URL from it."""
    if not names:
        return {}
    return {row.name: row for row in session.scalars(select(Tenant).where(Tenant.name.in_(sorted(names))))}


def check_admission_in(session: Session, tenant: str, row: Tenant | None, count: int, settings, now: datetime) -> None:
    """check_admission with the tenant's row already read (None: it has none), in `session`."""
    quotas = quotas_of(row, settings)
    if quotas.rate_per_minute:
        window = now - timedelta(seconds=60)
        recent = list(
            session.scalars(
                select(Job.created_at)
                .where(Job.tenant == tenant, Job.created_at > window)
                .order_by(Job.created_at)
                .limit(quotas.rate_per_minute)
            )
        )
        if len(recent) + count > quotas.rate_per_minute:
            if count > quotas.rate_per_minute:
                raise QuotaExceeded(f"{count} jobs at once exceed tenant {tenant}'s rate of {quotas.rate_per_minute} per minute", 60.0)
            # Room opens when the oldest submission of the window leaves it.
            freed = recent[len(recent) + count - quotas.rate_per_minute - 1]
            wait = max(1.0, (freed + timedelta(seconds=60) - now).total_seconds())
            raise QuotaExceeded(f"tenant {tenant} is over its rate of {quotas.rate_per_minute} jobs per minute", wait)
    if quotas.daily_budget:
        used = paid_today(session, tenant, now)
        if used + count > quotas.daily_budget:
            wait = max(1.0, (_day_start(now) + timedelta(days=1) - now).total_seconds())
            raise QuotaExceeded(f"tenant {tenant} has used {used} of its daily budget of {quotas.daily_budget} paid jobs", wait)


def paid_submissions_today(sessions: sessionmaker[Session], *, clock: Clock = utcnow) -> dict[str, int]:
    """Provider submissions paid today (UTC, by submit time) per tenant: one GROUP BY."""
    with sessions() as session:
        rows = session.execute(
            select(Job.tenant, func.coalesce(func.sum(Job.paid_submissions), 0))
            .where(Job.submitted_at >= _day_start(clock()), Job.paid_submissions > 0)
            .group_by(Job.tenant)
        ).all()
    return {tenant: int(count) for tenant, count in rows}


@dataclass(frozen=True)
class Usage:
    tenant: str
    by_state: dict[str, int]
    paid_today: int
    paid_submissions_today: int
    cost_today: float


def usage(sessions: sessionmaker[Session], settings, *, tenant: str | None = None, clock: Clock = utcnow) -> list[Usage]:
    """Per tenant: jobs by state, paid jobs admitted today, provider submissions paid today and their cost."""
    now = clock()
    with sessions() as session:
        names = (
            [tenant] if tenant else sorted(set(session.scalars(select(Tenant.name))) | set(session.scalars(select(Job.tenant).distinct())))
        )
        out = []
        for name in names:
            by_state = {s: n for s, n in session.execute(select(Job.state, func.count()).where(Job.tenant == name).group_by(Job.state))}
            submissions = int(
                session.scalar(
                    select(func.coalesce(func.sum(Job.paid_submissions), 0)).where(Job.tenant == name, Job.submitted_at >= _day_start(now))
                )
                or 0
            )
            out.append(
                Usage(
                    tenant=name,
                    by_state=by_state,
                    paid_today=paid_today(session, name, now),
                    paid_submissions_today=submissions,
                    cost_today=round(submissions * settings.cost_per_submission, 6),
                )
            )
        return out
