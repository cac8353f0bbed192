"""Which queued jobs the submitter takes next: tenants take turns (weighted by their share of what
is in flight at the provider), `priority` orders jobs within a tenant, and a tenant at its
in-flight cap waits. One tenant's burst of thousands of jobs never sits in front of another's one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, literal, or_, select, text, union_all
from sqlalchemy.orm import Session

from models import Job, Tenant
from worker.core.states import State
from worker.core.tenants import quotas_for, quotas_of
from worker.engine.deps import Deps

# Jobs at the provider (or about to be): what a tenant's in-flight cap and fair share count.
IN_FLIGHT = (State.SUBMITTING.value, State.PROCESSING.value, State.UPLOADING.value)
PRIORITY_RANK = case({"high": 0, "normal": 1, "low": 2}, value=Job.priority, else_=1)


@dataclass(frozen=True)
class TenantTurn:
    """A tenant's standing in this pass: jobs in flight, weight, cap (0 = none) and its due jobs."""

    tenant: str
    in_flight: int
    weight: int
    cap: int
    due: list[str]


def pick(turns: list[TenantTurn], limit: int, rng: random.Random | None = None) -> list[str]:
    """Up to `limit` job ids, one at a time to the tenant with the least in flight per weight
    (ties broken at random, so no tenant always goes first), never past a tenant's cap."""
    rng = rng or random.Random()
    load = {t.tenant: t.in_flight / max(1, t.weight) for t in turns}
    room = {t.tenant: (t.cap - t.in_flight) if t.cap else limit for t in turns}
    queues = {t.tenant: list(t.due) for t in turns}
    weights = {t.tenant: max(1, t.weight) for t in turns}
    order = {t.tenant: rng.random() for t in turns}
    picked: list[str] = []
    while len(picked) < limit:
        ready = [name for name, q in queues.items() if q and room[name] > 0]
        if not ready:
            break
        name = min(ready, key=lambda n: (load[n], order[n]))
        picked.append(queues[name].pop(0))
        load[name] += 1 / weights[name]
        room[name] -= 1
    return picked


def tenant_at_cap(deps: Deps, session: Session, tenant: str) -> bool:
    """Has `tenant` as many jobs in flight as its cap allows? (Task mode's per-job check; the
    batch submitter applies caps while it picks.)"""
    cap = quotas_for(session, tenant, deps.settings).max_in_flight
    if not cap:
        return False
    return (session.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.state.in_(IN_FLIGHT))) or 0) >= cap


def due_filter(now: datetime) -> tuple:
    return (
        Job.state == State.QUEUED.value,
        or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
        Job.deadline_at > now,
    )


PRIORITIES = ("high", "normal", "low")  # PRIORITY_RANK's order


def queued_tenants(session: Session) -> list[str]:
    """The tenants with queued jobs. On PostgreSQL a skip scan (a recursive CTE that hops from one
    tenant to the next in the partial queued index): one index probe per tenant, however many
    jobs are queued — a DISTINCT would read every queued row."""
    if session.get_bind().dialect.name != "postgresql":
        return list(session.scalars(select(Job.tenant).where(Job.state == State.QUEUED.value).distinct()))
    rows = session.execute(
        text(
            "WITH RECURSIVE t(tenant) AS ("
            " (SELECT tenant FROM jobs WHERE state = 'queued' ORDER BY tenant LIMIT 1)"
            " UNION ALL"
            " SELECT (SELECT j.tenant FROM jobs j WHERE j.state = 'queued' AND j.tenant > t.tenant ORDER BY j.tenant LIMIT 1)"
            " FROM t WHERE t.tenant IS NOT NULL"
            ") SELECT tenant FROM t WHERE tenant IS NOT NULL"
        )
    )
    return [row[0] for row in rows]


def due_of(session: Session, tenant: str, now: datetime, take: int) -> list[str]:
    """Up to `take` of `tenant`'s due jobs, high priority first, oldest first within one: one
    ordered index range per priority (the partial queued index), each stopped at `take`, merged —
    rather than sorting all of the tenant's queued jobs by a computed rank."""
    parts = [
        select(Job.id, literal(rank).label("rank"), Job.created_at)
        .where(Job.tenant == tenant, Job.priority == priority, *due_filter(now))
        .order_by(Job.created_at)
        .limit(take)
        .subquery()
        for rank, priority in enumerate(PRIORITIES)
    ]
    merged = union_all(*(select(part.c.id, part.c.rank, part.c.created_at) for part in parts)).subquery()
    return list(session.scalars(select(merged.c.id).order_by(merged.c.rank, merged.c.created_at).limit(take)))


def fair_candidates(deps: Deps, limit: int) -> list[str]:
    """The ids of up to `limit` due queued jobs in fair-share order (no lock taken: the caller
    leases them with a compare-and-set that re-checks they are still due)."""
    now = deps.clock()
    s = deps.settings
    with deps.sessions() as session:
        tenants = queued_tenants(session)
        if not tenants:
            return []
        flying = dict(
            session.execute(
                select(Job.tenant, func.count()).where(Job.state.in_(IN_FLIGHT), Job.tenant.in_(tenants)).group_by(Job.tenant)
            ).all()
        )
        rows = {row.name: row for row in session.scalars(select(Tenant).where(Tenant.name.in_(tenants)))}
        turns = []
        for name in tenants:
            row = rows.get(name)
            cap = quotas_of(row, s).max_in_flight
            in_flight = int(flying.get(name, 0))
            take = limit if not cap else min(limit, cap - in_flight)
            if take <= 0:
                continue
            due = due_of(session, name, now, take)
            if not due:
                continue  # queued, but nothing due yet (backed off, or past its deadline)
            turns.append(TenantTurn(name, in_flight, row.weight if row else 1, cap, due))
    return pick(turns, limit, deps.rng)
