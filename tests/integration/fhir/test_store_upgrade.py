"""A store created before the search index and the version timestamps gets both at start; older indexes are
replaced or dropped."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, inspect, select

from integration.db.store import Store
from integration.db.tables import FhirSearchIndex, UpgradeProgress
from integration.fhir import search as fhir_search
from integration.fhir.storage import prepare, put_resource
from tests.integration.db.before_migrations import as_before_migrations


def test_a_store_from_before_the_index_is_upgraded_and_indexed_at_start(store: Store) -> None:
    with store.session() as s:
        put_resource(s, {"resourceType": "Patient", "id": "old-1", "gender": "female",
                               "identifier": [{"system": "urn:mrn", "value": "u-1"}]})
        put_resource(s, {"resourceType": "Patient", "id": "old-2", "gender": "male"})
    with store.engine.begin() as conn:  # what a database from the previous release looks like
        as_before_migrations(conn)
        conn.exec_driver_sql("DROP TABLE fhir_search_index")
        conn.exec_driver_sql("DROP INDEX ix_fhir_versions_type_updated")
        conn.exec_driver_sql("ALTER TABLE fhir_resource_versions DROP COLUMN last_updated")
    store.stop()

    upgraded = Store(store.url)
    upgraded.start()
    prepare(upgraded)
    try:
        columns = {c["name"] for c in inspect(upgraded.engine).get_columns("fhir_resource_versions")}
        assert "last_updated" in columns
        query = fhir_search.parse_search("Patient", [("identifier", "urn:mrn|u-1")], strict=True)
        assert [r["id"] for r in fhir_search.run_search(upgraded, query).matches] == ["old-1"]
        with upgraded.session() as s:
            put_resource(s, {"resourceType": "Patient", "id": "old-2", "gender": "other"})
        total, versions = fhir_search.type_history(upgraded, "Patient", since=None, count=10, offset=0)
        assert total == 3 and versions[0][0]["gender"] == "other"
        assert fhir_search.reindex_if_empty(upgraded) == 0  # indexed already: nothing to do
    finally:
        upgraded.stop()


def test_the_value_index_of_an_older_store_becomes_the_covering_one_at_start(store: Store) -> None:
    with store.session() as s:
        put_resource(s, {"resourceType": "Patient", "id": "p-1", "identifier": [{"system": "urn:mrn",
                                                                                        "value": "u-1"}]})
    with store.engine.begin() as conn:  # the value index as the 2026-11 release created it
        as_before_migrations(conn)
        conn.exec_driver_sql("DROP INDEX ix_fhir_search_value_id")
        conn.exec_driver_sql("CREATE INDEX ix_fhir_search_value ON fhir_search_index "
                             "(resource_type, param, value, system) WHERE value IS NOT NULL")
        conn.exec_driver_sql("CREATE INDEX ix_fhir_resources_identifier ON fhir_resources (identifier)")
    store.stop()

    upgraded = Store(store.url)
    upgraded.start()
    prepare(upgraded)
    try:
        indexes = {i["name"]: i["column_names"] for i in inspect(upgraded.engine).get_indexes("fhir_search_index")}
        assert "ix_fhir_search_value" not in indexes
        assert indexes["ix_fhir_search_value_id"] == ["resource_type", "param", "value", "system", "resource_id"]
        resource_indexes = {i["name"] for i in inspect(upgraded.engine).get_indexes("fhir_resources")}
        assert "ix_fhir_resources_identifier" not in resource_indexes  # always NULL: only cost writes
        query = fhir_search.parse_search("Patient", [("identifier", "urn:mrn|u-1"), ("_total", "accurate")],
                                         strict=True)
        result = fhir_search.run_search(upgraded, query)
        assert result.total == 1 and [r["id"] for r in result.matches] == ["p-1"]
        if upgraded.engine.dialect.name == "postgresql":
            with upgraded.engine.connect() as conn:
                target = conn.exec_driver_sql("SELECT stxstattarget FROM pg_statistic_ext "
                                              "WHERE stxname = 'fhir_search_index_value_stats'").scalar()
            assert target == 300
        upgraded.stop()
        again = Store(store.url)  # starting twice changes nothing
        again.start()
        again.stop()
    finally:
        upgraded.stop()


class _Crash(Exception):
    pass


def test_the_search_reindex_resumes_where_a_crash_stopped_it(store: Store) -> None:
    with store.session() as s:
        for i in range(23):
            put_resource(s, {"resourceType": "Patient", "id": f"p-{i:02}", "gender": "female",
                             "identifier": [{"system": "urn:mrn", "value": f"u-{i}"}]})
        expected = s.scalar(select(func.count()).select_from(FhirSearchIndex))
        # a store from before the index: resources, no index rows, no reindex begun
        s.execute(delete(FhirSearchIndex))
        s.execute(delete(UpgradeProgress))

    def crash_after_two_batches(done: int) -> None:
        if done >= 10:
            raise _Crash(f"killed after {done} resources")

    with pytest.raises(_Crash):
        fhir_search.reindex_if_empty(store, batch=5, after_batch=crash_after_two_batches)
    with store.session() as s:
        progress = s.get(UpgradeProgress, fhir_search.REINDEX_TASK)
        assert progress is not None and (progress.done, progress.finished_at) == (10, None)
        assert progress.position == ["Patient", "p-09"]
        assert 0 < (s.scalar(select(func.count()).select_from(FhirSearchIndex)) or 0) < expected

    assert fhir_search.reindex_if_empty(store, batch=5) == 13  # the restart: the rest, not the first ten again
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(FhirSearchIndex)) == expected  # no row twice
        assert s.get(UpgradeProgress, fhir_search.REINDEX_TASK).finished_at is not None  # type: ignore[union-attr]
    query = fhir_search.parse_search("Patient", [("identifier", "urn:mrn|u-22")], strict=True)
    assert [r["id"] for r in fhir_search.run_search(store, query).matches] == ["p-22"]
    assert fhir_search.reindex_if_empty(store) == 0  # finished: never again
