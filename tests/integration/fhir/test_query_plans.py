"""Every search the FHIR API offers is served by an index, never by a full scan of the resources or
the search index: the SQL each search really issues is captured and explained on SQLite
(EXPLAIN QUERY PLAN, after ANALYZE) and on PostgreSQL (EXPLAIN with ANALYZE statistics and
enable_seqscan=off, which proves that an index can serve it)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from integration.db.store import Store
from integration.fhir import search as fhir_search
from integration.fhir.storage import put_resource

TABLES = ("fhir_resources", "fhir_search_index", "fhir_resource_versions")

SEARCHES: list[tuple[str, list[tuple[str, str]]]] = [
    ("Observation", [("_id", "obs-7,obs-8")]),
    ("Observation", [("_lastUpdated", "ge2020-01-01")]),
    ("Observation", [("identifier", "urn:lab|acc-5")]),
    ("Observation", [("identifier", "acc-5")]),
    ("Observation", [("identifier", "urn:lab|")]),
    ("Observation", [("patient", "Patient/pat-3")]),
    ("Observation", [("subject", "pat-3")]),
    ("Observation", [("code", "http://loinc.org|code-7")]),
    ("Observation", [("code", "code-7,code-8")]),
    ("Observation", [("status", "amended")]),
    ("Observation", [("status", "final")]),  # broad: walked in _lastUpdated order, each row probed
    ("Observation", [("category", "laboratory"), ("date", "ge2020-03-01")]),
    ("Observation", [("category", "vital-signs")]),
    ("Observation", [("date", "2020-02-02")]),
    ("Observation", [("date", "ge2020-03-01")]),
    ("Observation", [("date", "gt2020-03-01")]),
    ("Observation", [("date", "lt2020-01-10")]),
    ("Observation", [("date", "le2020-01-10")]),
    ("Observation", [("date", "sa2020-03-01")]),
    ("Observation", [("date", "eb2020-01-10")]),
    ("Observation", [("date", "ap2020-01-10")]),
    ("Observation", [("patient", "pat-3"), ("code", "code-3"), ("date", "ge2020-01")]),
    ("Observation", [("patient", "pat-3"), ("_sort", "-date")]),
    ("Observation", [("code", "code-7"), ("_summary", "count")]),
    ("Observation", [("code", "code-7"), ("_count", "5"), ("_total", "accurate")]),  # counted in the index alone
    ("Observation", [("status", "final"), ("_count", "5"), ("_total", "accurate")]),
    ("Observation", [("status", "final"), ("_count", "5"), ("_total", "none")]),
    ("Patient", [("family", "fam-1")]),
    ("Patient", [("identifier", "urn:mrn|mrn-9")]),
    ("DiagnosticReport", [("subject", "Patient/pat-3"), ("_include", "DiagnosticReport:result"),
                          ("_include", "DiagnosticReport:subject")]),
]


def _fill(store: Store) -> None:
    with store.session() as s:
        for p in range(200):
            put_resource(s, {"resourceType": "Patient", "id": f"pat-{p}", "gender": "female",
                                   "identifier": [{"system": "urn:mrn", "value": f"mrn-{p}"}],
                                   "name": [{"family": f"fam-{p}", "given": ["g"]}]})
        for o in range(3000):
            put_resource(s, {
                "resourceType": "Observation", "id": f"obs-{o}", "status": "final" if o % 50 else "amended",
                "identifier": [{"system": "urn:lab", "value": f"acc-{o}"}],
                "category": [{"coding": [{"code": "laboratory" if o % 40 else "vital-signs"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": f"code-{o % 60}"}]},
                "subject": {"reference": f"Patient/pat-{o % 200}"},
                "effectiveDateTime": f"2020-{1 + o % 12:02d}-{1 + o % 28:02d}",
            })
        for r in range(200):
            put_resource(s, {
                "resourceType": "DiagnosticReport", "id": f"rep-{r}", "status": "final", "code": {"text": "x"},
                "subject": {"reference": f"Patient/pat-{r}"}, "result": [{"reference": f"Observation/obs-{r}"}],
            })


@contextmanager
def captured_selects(store: Store) -> Iterator[list[tuple[str, Any]]]:
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)


def _sqlite_full_scans(plan: list[str]) -> list[str]:
    # "SCAN t" (or "SCAN t USING COVERING INDEX") reads every row; "SEARCH t USING ..." seeks
    return [line for line in plan if line.startswith("SCAN") and any(t in line for t in TABLES)]


def _postgres_full_scans(plan: list[str]) -> list[str]:
    """Seq scans of our tables, and index scans without an Index Cond (a walk of the whole index)."""
    bad = []
    for i, line in enumerate(plan):
        if not any(f" on {t}" in line for t in TABLES):
            continue
        if "Seq Scan" in line:
            bad.append(line)
        elif "Index" in line and "Scan" in line:
            indent = len(line) - len(line.lstrip())
            block = []
            for nxt in plan[i + 1:]:
                if len(nxt) - len(nxt.lstrip()) <= indent or nxt.lstrip().startswith("->"):
                    break
                block.append(nxt)
            if not any("Index Cond" in b for b in block):
                bad.append(line)
    return bad


def explain(store: Store, statement: str, parameters: Any) -> list[str]:
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return [str(r[-1]) for r in rows]
        conn.exec_driver_sql("SET enable_seqscan = off")
        return [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()]


@pytest.mark.timeout(600)
def test_every_search_is_served_by_an_index(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(store)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    checked = 0
    report: list[str] = []
    for rtype, params in SEARCHES:
        with captured_selects(store) as statements:
            result = fhir_search.run_search(store, fhir_search.parse_search(rtype, params, strict=True))
        assert result.total is None or result.total > 0, (rtype, params)  # finding nothing proves little
        assert statements
        for statement, parameters in statements:
            plan = explain(store, statement, parameters)
            full = _sqlite_full_scans(plan) if store.engine.dialect.name == "sqlite" else _postgres_full_scans(plan)
            assert not full, f"{rtype}?{params}: full scan\n{statement}\n" + "\n".join(plan)
            report.append(f"{rtype}?{'&'.join(f'{k}={v}' for k, v in params)}\n  " + "\n  ".join(plan))
            checked += 1
    # conditional criteria (If-None-Exist, conditional update, transaction entries) use the same path
    with captured_selects(store) as statements, store.session() as s:
        assert fhir_search.matching_ids(s, "Patient", "identifier=urn:mrn|mrn-9") == ["pat-9"]
    for statement, parameters in statements:
        plan = explain(store, statement, parameters)
        assert not (_sqlite_full_scans(plan) if store.engine.dialect.name == "sqlite"
                    else _postgres_full_scans(plan)), "\n".join(plan)
    assert checked >= len(SEARCHES)
    with capsys.disabled():
        print(f"\n--- query plans ({store.engine.dialect.name}) ---\n" + "\n".join(report[:6]))
    assert re.search(r"ix_fhir_search_(value|date_start|date_end)", "\n".join(report))
