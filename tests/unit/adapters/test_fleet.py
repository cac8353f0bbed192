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


def test_workers_seen_are_those_whose_heartbeat_is_recent():
    wall = Ticks()
    wall.t = 1_000_000.0
    fleet = MemoryFleet(clock=Ticks(), wall_clock=wall)
    assert fleet.workers_seen(60) == {}
    fleet.heartbeat("w1@node-a", {"pid": 11, "host": "node-a"})
    wall.t += 45
    fleet.heartbeat("w2@node-b", {"pid": 22, "host": "node-b"})
    wall.t += 30  # w1 beat 75 s ago, w2 30 s ago
    seen = fleet.workers_seen(60)
    assert list(seen) == ["w2@node-b"]
    assert seen["w2@node-b"] == {"pid": 22, "host": "node-b", "seen": 1_000_045.0}
    assert set(fleet.workers_seen(120)) == {"w1@node-a", "w2@node-b"}
    fleet.heartbeat("w1@node-a", {"pid": 12, "host": "node-a"})  # restarted: a new pid, seen now
    assert fleet.workers_seen(60)["w1@node-a"]["pid"] == 12
