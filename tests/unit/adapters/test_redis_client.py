"""The Redis version check: a server older than 6.2 is refused with one clear line."""

from __future__ import annotations

import pytest

from worker.adapters.redis_client import require_supported, server_version
from worker.errors import UnsupportedRedis


class FakeServer:
    def __init__(self, version: str):
        self.version = version

    def info(self, section: str) -> dict:
        assert section == "server"
        return {"redis_version": self.version, "redis_mode": "standalone"}


@pytest.mark.parametrize("version", ["6.2.0", "6.2.14", "7.0.15", "7.2.4", "8.0.2", "10.0.0"])
def test_redis_6_2_and_newer_are_accepted(version):
    require_supported(FakeServer(version))


@pytest.mark.parametrize("version", ["6.0.16", "5.0.7", "4.0.9"])
def test_an_older_redis_is_refused_with_one_line(version):
    with pytest.raises(UnsupportedRedis) as err:
        require_supported(FakeServer(version))
    message = str(err.value)
    assert "\n" not in message and version in message and "6.2 or newer" in message


def test_a_release_candidate_version_is_read_by_its_numbers():
    assert server_version(FakeServer("7.4-rc1")) == (7, 4)
