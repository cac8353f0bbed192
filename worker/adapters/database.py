"""Engines and sessions: one pooled engine per database URL per process, and `migrate()`.

SQLite (the embedded default) gets WAL and a busy timeout so several worker processes can share it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from worker.errors import UnsupportedDatabase

_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: after a database restart, stale pooled connections are replaced, not used.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_recycle=1800)


def get_engine(url: str) -> Engine:
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def dispose_all() -> None:
    """Drop pooled connections (after fork: each Celery child must open its own)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)


def alembic_config(database_url: str):
    from alembic.config import Config

    root = Path(__file__).resolve().parents[2] / "migrations"
    cfg = Config()
    cfg.set_main_option("script_location", str(root))
    cfg.attributes["database_url"] = database_url
    cfg.attributes["configure_logging"] = False
    return cfg


# The oldest PostgreSQL every statement here runs on (MATERIALIZED CTEs need 12; 14 is the oldest
# still maintained, and the one the integration tests and CI cover up from).
MIN_POSTGRES = (14, 0)


def require_supported(url: str, *, engine: Any = None) -> None:
    """Refuse a PostgreSQL older than MIN_POSTGRES with a one-line UnsupportedDatabase (SQLite is
    always fine). `engine`: the one for `url` (default: the process's)."""
    engine = engine or get_engine(url)
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        number = int(conn.execute(text("SHOW server_version_num")).scalar_one())
    version = (number // 10000, number % 10000)
    if version < MIN_POSTGRES:
        raise UnsupportedDatabase(
            f"PostgreSQL {version[0]}.{version[1]} is not supported: edit-worker needs PostgreSQL {MIN_POSTGRES[0]} or newer"
        )


def migrate(database_url: str, revision: str = "head") -> None:
    """`alembic upgrade head` on the given database (refusing a PostgreSQL that is too old)."""
    from alembic import command

    require_supported(database_url)
    command.upgrade(alembic_config(database_url), revision)
