"""Schema migrations (Alembic) on SQLite and PostgreSQL: a fresh database at head matches
integration.db.tables; a database made by the code before migrations upgrades in place; a NOT NULL column
that cannot be added fails loudly; processes starting together migrate once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from integration.db import schema
from integration.db.migrations.env_options import include_object
from integration.db.store import Store
from integration.db.tables import Base, Review
from integration.fhir import search as fhir_search
from integration.fhir.storage import prepare
from tests.integration.db import tables_before_migrations as before

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    e = create_engine(url)
    yield e
    e.dispose()


def differences(engine: Engine) -> list[object]:
    """What autogenerate would write for integration.db.tables against ``engine``'s database."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": include_object, "compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_the_migrations_head_matches_the_tables(url: str, engine: Engine) -> None:
    """Fails when integration/db/tables.py changed without a migration: run ``medbridge db revision -m
    '...'`` (see README, "Schema changes"), review the script, commit it with the change."""
    store = Store(url)
    store.start()
    store.stop()
    assert schema.current_revision(engine) == schema.head_revision()
    assert differences(engine) == []


def _made_before_migrations(engine: Engine) -> None:
    """A database as the code before migrations left it: its tables, its search-index statistics, some rows."""
    before.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("CREATE STATISTICS IF NOT EXISTS fhir_search_index_value_stats (mcv) "
                                 "ON resource_type, param, value FROM fhir_search_index")
        conn.execute(before.FhirResource.__table__.insert(), [{
            "resource_type": "Patient", "id": "p1", "version_id": 1, "last_updated": before.utcnow(),
            "deleted": False, "content": {"resourceType": "Patient", "id": "p1", "gender": "female",
                                          "meta": {"versionId": "1", "lastUpdated": "2026-12-01T00:00:00Z"}}}])
        conn.execute(before.Review.__table__.insert(), [{
            "report_id": "r1", "action": "final", "reviewer": "Dr A", "at": before.utcnow(), "reason": None}])


def test_a_database_made_before_migrations_upgrades_in_place(url: str, engine: Engine) -> None:
    _made_before_migrations(engine)
    with engine.begin() as conn:  # and from before 2026-12: a column added since, an index replaced since
        conn.exec_driver_sql("ALTER TABLE reviews DROP COLUMN report_version")
        conn.exec_driver_sql("DROP INDEX ix_fhir_search_value_id")
        conn.exec_driver_sql("CREATE INDEX ix_fhir_search_value ON fhir_search_index "
                             "(resource_type, param, value, system) WHERE value IS NOT NULL")
    assert schema.current_revision(engine) is None

    store = Store(url)
    store.start()
    prepare(store)  # the search index was empty: every resource gets indexed
    try:
        assert schema.current_revision(engine) == schema.head_revision()
        assert differences(engine) == []
        assert "ix_fhir_search_value" not in {i["name"] for i in inspect(engine).get_indexes("fhir_search_index")}
        with store.session() as s:
            (review,) = s.query(Review).all()
            assert (review.reviewer, review.report_version) == ("Dr A", None)
        query = fhir_search.parse_search("Patient", [("gender", "female")], strict=True)
        assert [r["id"] for r in fhir_search.run_search(store, query).matches] == ["p1"]
    finally:
        store.stop()
    again = Store(url)  # a second start finds head: nothing to do
    again.start()
    again.stop()
    assert schema.current_revision(engine) == schema.head_revision()


def test_a_not_null_column_that_cannot_be_added_fails_the_start_loudly(url: str, engine: Engine) -> None:
    _made_before_migrations(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE fhir_resources DROP COLUMN version_id")
    store = Store(url)
    with pytest.raises(schema.SchemaUpgradeError, match="fhir_resources lacks the NOT NULL column version_id"):
        store.start()
    store.stop()
    assert schema.current_revision(engine) is None  # nothing stamped: the next start tries again


def test_processes_starting_together_migrate_once_and_all_find_head(url: str, engine: Engine) -> None:
    code = "import sys; from integration.db.store import Store; s = Store(sys.argv[1]); s.start(); s.stop()"
    starts = [subprocess.Popen([sys.executable, "-c", code, url], cwd=REPO, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    for p in starts:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert schema.current_revision(engine) == schema.head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    assert differences(engine) == []
