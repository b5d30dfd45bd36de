"""The store on SQLite and PostgreSQL: versions, optimistic locking, change trackers, outbox; WAL checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from integration.errors import ResourceNotFoundError, VersionConflictError
from integration.store import FhirResourceVersion, Store
from schemas.events import TOPIC_RECORD_RECEIVED, RecordReceived


def test_versions_are_kept_and_if_match_guards_updates(store: Store) -> None:
    with store.session() as s:
        first, created = Store.put_resource(s, {"resourceType": "Patient", "id": "a", "gender": "male"})
    assert created and first["meta"]["versionId"] == "1"
    with store.session() as s:
        second, created = Store.put_resource(s, {"resourceType": "Patient", "id": "a", "gender": "female"}, if_match=1)
    assert not created and second["meta"]["versionId"] == "2"
    with pytest.raises(VersionConflictError), store.session() as s:
        Store.put_resource(s, {"resourceType": "Patient", "id": "a"}, if_match=1)
    assert store.get_resource("Patient", "a")["gender"] == "female"
    with store.session() as s:
        assert s.query(FhirResourceVersion).filter_by(id="a").count() == 2
    with pytest.raises(ResourceNotFoundError):
        store.get_resource("Patient", "missing")


def test_a_tracker_changed_after_it_was_read_is_not_claimed(store: Store) -> None:
    with store.session() as s:
        Store.touch(s, "study", "1.2.3", at=0)
    (due,) = store.due_trackers("study", quiet_seconds=1)
    with store.session() as s:
        Store.touch(s, "study", "1.2.3")  # another instance arrives meanwhile
    with store.session() as s:
        assert not Store.claim_tracker(s, due)
    assert store.due_trackers("study", quiet_seconds=1) == []  # not quiet yet
    store.expedite("study", ["1.2.3"], quiet_seconds=1)
    (due,) = store.due_trackers("study", quiet_seconds=1)
    assert due.revision == 2
    with store.session() as s:
        assert Store.claim_tracker(s, due)
    assert store.due_trackers("study", quiet_seconds=1) == []


def test_outbox_is_written_with_the_state_and_drained_in_order(store: Store) -> None:
    events = [RecordReceived(patient_ref=f"Patient/{i}", revision=1) for i in range(3)]
    with store.session() as s:
        for e in events:
            Store.add_to_outbox(s, TOPIC_RECORD_RECEIVED, e, key=e.patient_ref)
    with pytest.raises(RuntimeError), store.session() as s:
        Store.add_to_outbox(s, TOPIC_RECORD_RECEIVED, RecordReceived(patient_ref="Patient/x", revision=1), key=None)
        raise RuntimeError("the transaction fails, so its event must not exist")
    pending = store.pending_outbox()
    assert [p.event_id for p in pending] == [e.event_id for e in events]
    store.mark_published([pending[0].id])
    assert store.outbox_backlog() == 2


def test_sqlite_wal_is_checkpointed_into_the_database_as_writes_go_on(tmp_path: Path) -> None:
    """The store's checkpointer thread copies the WAL into the database (commits leave it to that thread)."""
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.start()
    database = tmp_path / "store.db"
    try:
        before = database.stat().st_size
        note = {"text": "x" * 3000}
        for batch in range(10):  # ~12 MB into the WAL: past the checkpoint's 1,000 pages many times
            resources = [{"resourceType": "Basic", "id": f"{batch}-{i}", "code": note} for i in range(200)]
            with store.session() as s:
                Store.put_resources(s, resources, [None] * len(resources))
        deadline = time.monotonic() + 10
        while database.stat().st_size < before + 8_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert database.stat().st_size >= before + 8_000_000
        assert store.get_resource("Basic", "9-199")["code"] == note
    finally:
        store.stop()
        store.stop()  # stopping twice changes nothing
