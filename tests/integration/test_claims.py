"""Claims on real PostgreSQL: a submitter's lease and a poller's claim take at most their limit,
and two at once never take the same job (FOR UPDATE SKIP LOCKED, from a materialized CTE:
PostgreSQL may re-run an `IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)` subquery and then take
more than n rows)."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import update

from worker.core.jobs import JOBS, utcnow
from worker.engine import poller, submitter

pytestmark = pytest.mark.integration


def _deps(cluster):
    return SimpleNamespace(settings=cluster.settings, sessions=cluster.sessions(), clock=utcnow, rng=random.Random(7))


def _queue(cluster, sample_image, n: int) -> None:
    from worker.producer import submit_edit_many

    items = [{"image": str(sample_image), "prompt": f"claim test {i}", "size": "512*512"} for i in range(n)]
    submit_edit_many(items, settings=cluster.settings, publisher=SimpleNamespace(publish=lambda *a, **k: None))


def _four_at_once(claim) -> list[list]:
    """Run `claim()` in four threads released together; their results."""
    results: list[list] = []
    barrier = threading.Barrier(4)

    def one():
        barrier.wait()
        results.append(claim())

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_leases_take_at_most_their_limit_and_never_the_same_job_twice(cluster, sample_image):
    _queue(cluster, sample_image, 60)
    deps = _deps(cluster)
    assert len(submitter.lease_queued(deps, 7)) == 7
    results = _four_at_once(lambda: submitter.lease_queued(deps, 10))
    ids = [lease.job_id for batch in results for lease in batch]
    assert all(len(batch) <= 10 for batch in results)
    assert len(ids) == len(set(ids)) == 40  # 53 were free: every lease got its 10, no overlap


def test_poller_claims_take_at_most_their_limit_and_never_the_same_job_twice(cluster, sample_image):
    _queue(cluster, sample_image, 60)
    deps = _deps(cluster)
    past = utcnow() - timedelta(seconds=5)
    with deps.sessions() as session:  # as if all 60 were at the provider and due for a poll
        session.execute(update(JOBS).values(state="processing", next_poll_at=past, prediction_id=JOBS.c.id))
        session.commit()
    assert len(poller.claim_due(deps, 7)) == 7
    results = _four_at_once(lambda: poller.claim_due(deps, 10))
    ids = [target.job_id for batch in results for target, _ in batch]
    assert all(len(batch) <= 10 for batch in results)
    assert len(ids) == len(set(ids)) == 40


def test_transition_many_on_postgresql_moves_only_jobs_whose_claim_holds_with_their_events_and_callbacks(cluster, sample_image):
    from sqlalchemy import func, select

    from worker.core.deliveries import DELIVERIES
    from worker.core.jobs import EVENTS, Move, transition_many
    from worker.core.states import State

    _queue(cluster, sample_image, 4)
    deps = _deps(cluster)
    with deps.sessions() as session:
        session.execute(update(JOBS).values(state="uploading", poll_seq=3, callback_url=None))
        ids = sorted(session.scalars(select(JOBS.c.id)))
        session.execute(update(JOBS).where(JOBS.c.id == ids[0]).values(callback_url="https://callbacks.example/hook"))
        session.commit()
    moves = [Move(job_id, f"stored {i}", 3 if i != 1 else 2, {"outputs": [f"s3://b/{job_id}/0.png"]}) for i, job_id in enumerate(ids)]
    moved = transition_many(deps.sessions, State.UPLOADING, State.SUCCEEDED, moves, provider_outputs=None, error_code=None)
    assert set(moved) == set(ids) - {ids[1]}  # ids[1]'s claim version is stale: its CAS loses
    assert moved[ids[0]].callback_url == "https://callbacks.example/hook"
    with deps.sessions() as session:
        rows = {r.id: r for r in session.execute(select(JOBS.c.id, JOBS.c.state, JOBS.c.outputs, JOBS.c.finished_at))}
        events = session.execute(select(EVENTS.c.job_id, EVENTS.c.reason).where(EVENTS.c.to_state == "succeeded")).all()
        deliveries = session.execute(select(DELIVERIES.c.job_id, func.count()).group_by(DELIVERIES.c.job_id)).all()
    assert rows[ids[1]].state == "uploading" and rows[ids[1]].finished_at is None
    for i in (0, 2, 3):
        assert (rows[ids[i]].state, rows[ids[i]].outputs) == ("succeeded", [f"s3://b/{ids[i]}/0.png"])
        assert rows[ids[i]].finished_at is not None
    assert sorted(events) == sorted((ids[i], f"stored {i}") for i in (0, 2, 3))
    assert deliveries == [(ids[0], 1)]
