"""The Alembic revisions build exactly the schema the models describe (indexes included), and the
newest one downgrades cleanly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from models import Base
from worker.adapters.database import alembic_config, migrate


def test_the_migrated_schema_matches_the_models(database_url):
    engine = create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_the_list_indexes_come_and_go_with_revision_0002(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path}/m.db"
    migrate(url)
    engine = create_engine(url)
    assert {"ix_jobs_created_at_id", "ix_jobs_state_created_at_id"} <= {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
    command.downgrade(alembic_config(url), "0001")
    assert not {"ix_jobs_created_at_id", "ix_jobs_state_created_at_id"} & {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
    engine.dispose()
