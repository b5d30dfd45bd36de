"""Acknowledged writes are durable on SQLite: the transactions behind a 2xx FHIR answer and a review decision
commit with ``synchronous=FULL``; the others keep ``NORMAL``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from integration.db.store import Store
from integration.db.tables import AiResult, Review
from integration.fhir.resources import store_resource, validate_resource
from tests import authorized
from tests.conftest import serve_app, stack_settings

FULL, NORMAL = 2, 1


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.start()
    yield store
    store.stop()


def _synchronous_at_commits(store: Store) -> list[int]:
    """The ``PRAGMA synchronous`` of the connection at each commit of a transaction that wrote, from now on
    (pysqlite begins a transaction at the first write only: a read-only session's commit has none)."""
    seen: list[int] = []

    @event.listens_for(store.engine, "commit")
    def _at_commit(conn: Any) -> None:
        dbapi = conn.connection.driver_connection
        if dbapi.in_transaction:
            seen.append(dbapi.execute("PRAGMA synchronous").fetchone()[0])

    return seen


def test_a_durable_session_runs_synchronous_full_and_the_next_one_normal_again(sqlite_store: Store) -> None:
    with sqlite_store.session(durable=True) as s:
        assert s.execute(text("PRAGMA synchronous")).scalar() == FULL
    with sqlite_store.session() as s:  # the same pooled connection, handed back reset
        assert s.execute(text("PRAGMA synchronous")).scalar() == NORMAL


def test_fhir_writes_answered_2xx_commit_with_synchronous_full(sqlite_store: Store, tmp_path: Path) -> None:
    commits = _synchronous_at_commits(sqlite_store)
    with serve_app(stack_settings(tmp_path), sqlite_store) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Content-Type": "application/fhir+json"}
    ) as client:
        created = client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "male"})
        assert created.status_code == 201
        pid = created.json()["id"]
        assert commits and set(commits) == {FULL}
        commits.clear()
        assert client.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid}).status_code == 200
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "gender": "female"},
             "request": {"method": "POST", "url": "Patient"}}]}
        assert client.post("/fhir", json=bundle).status_code == 200
        assert client.delete(f"/fhir/Patient/{pid}").status_code == 204
        assert commits and set(commits) == {FULL}
    with sqlite_store.session() as s:
        assert s.execute(text("PRAGMA synchronous")).scalar() == NORMAL


def test_a_review_decision_commits_with_synchronous_full(sqlite_store: Store, tmp_path: Path) -> None:
    report = {"resourceType": "DiagnosticReport", "id": "r1", "status": "preliminary", "code": {"text": "AI read"}}
    with sqlite_store.session() as s:
        store_resource(s, validate_resource(report), track=False)
        s.add(AiResult(report_id="r1", kind="imaging", source_event_id="e1", details={"instances": []}))
    commits = _synchronous_at_commits(sqlite_store)
    with serve_app(stack_settings(tmp_path), sqlite_store) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30
    ) as client:
        resp = client.post("/api/reports/r1/review", json={"action": "final"}, headers={"If-Match": 'W/"1"'})
        assert resp.status_code == 200, resp.text
    assert commits and set(commits) == {FULL}
    with sqlite_store.session() as s:
        assert s.query(Review).filter_by(report_id="r1").count() == 1
