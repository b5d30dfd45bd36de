"""A store created before the search index and the version timestamps gets both at start."""

from __future__ import annotations

from sqlalchemy import inspect

from integration import fhir_search
from integration.store import Store


def test_a_store_from_before_the_index_is_upgraded_and_indexed_at_start(store: Store) -> None:
    with store.session() as s:
        Store.put_resource(s, {"resourceType": "Patient", "id": "old-1", "gender": "female",
                               "identifier": [{"system": "urn:mrn", "value": "u-1"}]})
        Store.put_resource(s, {"resourceType": "Patient", "id": "old-2", "gender": "male"})
    with store.engine.begin() as conn:  # what a database from the previous release looks like
        conn.exec_driver_sql("DROP TABLE fhir_search_index")
        conn.exec_driver_sql("DROP INDEX ix_fhir_versions_type_updated")
        conn.exec_driver_sql("ALTER TABLE fhir_resource_versions DROP COLUMN last_updated")
    store.stop()

    upgraded = Store(store.url)
    upgraded.start()
    try:
        columns = {c["name"] for c in inspect(upgraded.engine).get_columns("fhir_resource_versions")}
        assert "last_updated" in columns
        query = fhir_search.parse_search("Patient", [("identifier", "urn:mrn|u-1")], strict=True)
        assert [r["id"] for r in fhir_search.run_search(upgraded, query).matches] == ["old-1"]
        with upgraded.session() as s:
            Store.put_resource(s, {"resourceType": "Patient", "id": "old-2", "gender": "other"})
        total, versions = fhir_search.type_history(upgraded, "Patient", since=None, count=10, offset=0)
        assert total == 3 and versions[0][0]["gender"] == "other"
        assert fhir_search.reindex_if_empty(upgraded) == 0  # indexed already: nothing to do
    finally:
        upgraded.stop()
