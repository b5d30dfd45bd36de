"""A search that can never succeed says so: too many values or parameters are a 400 naming the parameter,
answered before the database is asked (SQLite and PostgreSQL); a statement the database refuses as too
large is a 400 too, never a 503 "retry later"."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from integration.db.store import Store
from integration.errors import QueryTooComplexError
from integration.fhir.search import MAX_PARAM_VALUES, MAX_SEARCH_PARAMS, MAX_SEARCH_VALUES

LOINC = "http://loinc.org"


def codes(n: int) -> str:
    return ",".join(f"{LOINC}|{i}" for i in range(n))


def refused_naming(response: httpx.Response, parameter: str) -> str:
    assert response.status_code == 400, response.text
    (issue,) = response.json()["issue"]
    assert issue["expression"] == [parameter]
    return str(issue["diagnostics"])


def test_a_parameter_with_too_many_values_is_a_400_naming_it(fhir_client: httpx.Client) -> None:
    assert fhir_client.get("/fhir/Observation", params={"code": codes(MAX_PARAM_VALUES)}).status_code == 200
    said = refused_naming(fhir_client.get("/fhir/Observation", params={"code": codes(500)}), "code")
    assert "500 comma-separated values" in said


def test_a_search_with_too_many_parameters_is_a_400_naming_the_repeated_one(fhir_client: httpx.Client) -> None:
    assert fhir_client.get("/fhir/Patient", params=[("gender", "male")] * MAX_SEARCH_PARAMS).status_code == 200
    many = [("_count", "5")] + [("gender", "male")] * 1000
    refused_naming(fhir_client.get("/fhir/Patient", params=many), "gender")


def test_a_search_with_too_many_values_in_all_is_a_400(fhir_client: httpx.Client) -> None:
    per = MAX_SEARCH_VALUES // MAX_PARAM_VALUES
    assert fhir_client.get("/fhir/Observation", params=[("code", codes(MAX_PARAM_VALUES))] * per).status_code == 200
    over = [("code", codes(MAX_PARAM_VALUES))] * per + [("category", "laboratory")]
    refused_naming(fhir_client.get("/fhir/Observation", params=over), "category")


def test_a_statement_too_large_for_sqlite_is_refused_as_such_not_as_unavailable(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.start()
    try:
        for too_large in ("SELECT " + "1+" * 1100 + "1", "SELECT " + "(" * 100_000 + "1" + ")" * 100_000):
            with pytest.raises(QueryTooComplexError), store.read_session() as s:
                s.execute(text(too_large))
    finally:
        store.stop()
