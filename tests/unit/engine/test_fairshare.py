"""Fair share: tenants take turns by in-flight load per weight, priority orders a tenant's own jobs,
and a tenant at its in-flight cap waits in `queued`."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.core import tenants
from worker.engine import fairshare, submitter
from worker.engine.fairshare import TenantTurn


@pytest.fixture
def sub_deps(deps):
    deps.settings = deps.settings.model_copy(
        update={
            "poll_mode": "batch",
            "submit_mode": "batch",
            "submit_batch_size": 10,
            "submit_threads": 1,
            "submit_backpressure_seconds": 0.0,
        }
    )
    return deps


def test_pick_gives_the_next_slot_to_the_tenant_with_the_least_in_flight_per_weight():
    turns = [
        TenantTurn("big", in_flight=50, weight=1, cap=0, due=[f"b{i}" for i in range(100)]),
        TenantTurn("small", in_flight=0, weight=1, cap=0, due=["s0"]),
    ]
    assert fairshare.pick(turns, 1, random.Random(1)) == ["s0"]
    both = fairshare.pick(
        [TenantTurn("a", 0, 1, 0, ["a0", "a1", "a2"]), TenantTurn("b", 0, 2, 0, ["b0", "b1", "b2", "b3"])], 6, random.Random(3)
    )
    assert sorted(both) == sorted(["a0", "a1", "b0", "b1", "b2", "b3"])  # weight 2 gets twice the turns
    assert [x for x in both if x.startswith("a")] == ["a0", "a1"]  # a tenant's own order is kept


def test_pick_never_goes_past_a_tenants_cap():
    turns = [TenantTurn("capped", in_flight=2, weight=1, cap=3, due=["c0", "c1", "c2"]), TenantTurn("free", 0, 1, 0, ["f0"])]
    assert sorted(fairshare.pick(turns, 10, random.Random(0))) == ["c0", "f0"]


def test_one_tenants_single_job_is_submitted_in_the_first_pass_behind_another_tenants_burst(sub_deps, new_job, fake_provider, load):
    burst = [new_job(prompt=f"burst {i}", tenant="bulk") for i in range(40)]
    single = new_job(prompt="the one job", tenant="interactive")
    with ThreadPoolExecutor(max_workers=1) as pool:
        report = submitter.submit_due(sub_deps, executor=pool)
    assert report.started == 41 and load(single).state == "processing"
    prompts = [t.body["prompt"] for t in fake_provider.submissions]
    # Its turn comes at once (both tenants have nothing in flight: a coin toss for the first slot),
    # not after the 40 older jobs of the burst.
    assert prompts.index("the one job") < 2, prompts[:5]
    assert {load(j).state for j in burst} == {"processing"}


def test_priority_orders_jobs_within_a_tenant(sub_deps, new_job, load):
    low = new_job(prompt="low", priority="low")
    normal = new_job(prompt="normal")
    high = new_job(prompt="high", priority="high")
    assert fairshare.fair_candidates(sub_deps, 3) == [high, normal, low]
    assert load(high).priority == "high"


def test_a_tenant_at_its_in_flight_cap_waits_in_queued(sub_deps, new_job, load, sessions):
    tenants.set_tenant(sessions, "capped", max_in_flight=2)
    ids = [new_job(prompt=f"capped {i}", tenant="capped") for i in range(5)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = submitter.submit_due(sub_deps, executor=pool)
        again = submitter.submit_due(sub_deps, executor=pool)
    assert first.started == 2 and again.started == 0
    assert sorted(load(i).state for i in ids) == ["processing", "processing", "queued", "queued", "queued"]
    assert all(load(i).attempts == 0 for i in ids if load(i).state == "queued")


def test_task_mode_defers_a_job_whose_tenant_is_at_its_cap(deps, new_job, load, sessions, fake_provider):
    from worker.engine.submit import run_submit

    tenants.set_tenant(sessions, "capped", max_in_flight=1)
    first, second = new_job(prompt="one", tenant="capped"), new_job(prompt="two", tenant="capped")
    assert run_submit(deps, first).step == "poll"
    nxt = run_submit(deps, second)
    assert nxt.step == "submit" and nxt.countdown == deps.settings.poll_interval
    assert load(second).state == "queued" and load(second).attempts == 0 and len(fake_provider.submissions) == 1
