"""Specification of the schema's migrations where they carry data: revision 0003 (inputs in S3)
keeps every existing row's stored image payload, and a downgrade gives URL inputs their payload back."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, text

from worker.adapters.database import alembic_config, migrate

PAYLOAD = "data:image/png;base64,iVBORw0KGgo="
NOW = datetime(2026, 11, 1, tzinfo=timezone.utc).replace(tzinfo=None)


def insert_old_row(url: str, job_id: str, payload: str) -> None:
    with create_engine(url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, state, prompt, size, seed, image_ref, image_payload, enable_base64_output, attempts, "
                "outputs, has_nsfw_contents, poll_seq, deadline_at, created_at, updated_at) VALUES (:id, 'queued', 'p', "
                "'1024*1024', 1, 'file:a.png', :payload, 0, 0, '[]', '[]', 0, :now, :now, :now)"
            ),
            {"id": job_id, "payload": payload, "now": NOW},
        )


def test_revision_0003_keeps_the_payload_of_existing_rows_and_adds_empty_references(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    migrate(url, "0001")
    insert_old_row(url, "job-1", PAYLOAD)

    migrate(url)

    with create_engine(url).connect() as conn:
        row = conn.execute(text("SELECT image_payload, image_uri, image_sha256 FROM jobs WHERE id = 'job-1'")).one()
    assert tuple(row) == (PAYLOAD, None, None)


def test_downgrading_0003_gives_url_inputs_their_payload_back(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path}/new.db"
    migrate(url)
    with create_engine(url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, state, prompt, size, seed, image_ref, image_uri, enable_base64_output, attempts, "
                "outputs, has_nsfw_contents, poll_seq, deadline_at, created_at, updated_at) VALUES ('job-2', 'queued', 'p', "
                "'1024*1024', 1, 'https://x.example/a.png', 'https://x.example/a.png', 0, 0, '[]', '[]', 0, :now, :now, :now)"
            ),
            {"now": NOW},
        )

    command.downgrade(alembic_config(url), "0001")

    with create_engine(url).connect() as conn:
        assert conn.execute(text("SELECT image_payload FROM jobs WHERE id = 'job-2'")).scalar_one() == "https://x.example/a.png"


def test_a_postgresql_older_than_14_is_refused_with_one_line():
    from worker.adapters import database
    from worker.errors import UnsupportedDatabase

    class Conn:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, statement):
            return type("R", (), {"scalar_one": lambda self: "130011"})()

    class Engine:
        dialect = type("D", (), {"name": "postgresql"})()

        def connect(self):
            return Conn()

    with pytest.raises(UnsupportedDatabase, match=r"^PostgreSQL 13\.11 is not supported: edit-worker needs PostgreSQL 14 or newer$"):
        database.require_supported("postgresql+psycopg://db/x", engine=Engine())
    database.require_supported("sqlite:///x.db")  # SQLite: nothing to check
