"""The in-memory fleet marks and inference-time average (the Redis ones:
tests/integration/test_limits.py)."""

from __future__ import annotations

import pytest

from worker.adapters.fleet import MemoryFleet


class Ticks:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_once_grants_a_name_to_one_caller_until_its_ttl_or_forget():
    clock = Ticks()
    fleet = MemoryFleet(clock=clock)
    assert fleet.once("poller:node-1:0", ttl=10)
    assert not fleet.once("poller:node-1:0", ttl=10)
    assert fleet.once("poller:node-1:1", ttl=10)  # another name
    fleet.forget("poller:node-1:0")
    assert fleet.once("poller:node-1:0", ttl=10)
    clock.t = 10.5
    assert fleet.once("poller:node-1:1", ttl=10)  # lapsed


def test_the_typical_inference_time_is_a_weighted_average():
    fleet = MemoryFleet(clock=Ticks())
    assert fleet.typical_inference() is None
    fleet.observe_inference(10.0)
    fleet.observe_inference(20.0)  # weighted 0.2: 10 * 0.8 + 20 * 0.2
    assert fleet.typical_inference() == pytest.approx(12.0)


def test_heartbeats_list_the_workers_seen_within_a_window():
    wall = Ticks()
    wall.t = 1000.0
    fleet = MemoryFleet(wall=wall)
    fleet.heartbeat("host-a:11", {"pid": 11, "host": "host-a"})
    wall.t = 1010.0
    fleet.heartbeat("host-b:12", {"pid": 12, "host": "host-b"})

    seen = fleet.workers_seen(within=5)

    assert seen == {"host-b:12": {"pid": 12, "host": "host-b", "seen": 1010.0}}
    assert set(fleet.workers_seen(within=15)) == {"host-a:11", "host-b:12"}
    fleet.heartbeat("host-a:11", {"pid": 11, "host": "host-a"})  # beats again: alive again
    assert set(fleet.workers_seen(within=5)) == {"host-a:11", "host-b:12"}
