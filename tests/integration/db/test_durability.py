"""Acknowledged writes are durable on SQLite: the transactions behind a 2xx FHIR answer commit with
``synchronous=FULL``; the others keep ``NORMAL``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from integration.db.store import Store
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
    """The ``PRAGMA synchronous`` of the connection at each commit from now on."""
    seen: list[int] = []

    @event.listens_for(store.engine, "commit")
    def _at_commit(conn: Any) -> None:
        seen.append(conn.connection.driver_connection.execute("PRAGMA synchronous").fetchone()[0])

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
