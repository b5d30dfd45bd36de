"""The store on SQLite and PostgreSQL: versions, optimistic locking, change trackers, outbox; WAL checkpoints."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from integration.db.store import Store
from integration.db.tables import DicomInstance, FhirResourceVersion, utcnow
from integration.errors import ResourceNotFoundError, StoreUnavailableError, VersionConflictError
from integration.fhir.storage import get_resource, put_resource, put_resources
from schemas.events import TOPIC_RECORD_RECEIVED, RecordReceived


def test_versions_are_kept_and_if_match_guards_updates(store: Store) -> None:
    with store.session() as s:
        first, created = put_resource(s, {"resourceType": "Patient", "id": "a", "gender": "male"})
    assert created and first["meta"]["versionId"] == "1"
    with store.session() as s:
        second, created = put_resource(s, {"resourceType": "Patient", "id": "a", "gender": "female"}, if_match=1)
    assert not created and second["meta"]["versionId"] == "2"
    with pytest.raises(VersionConflictError), store.session() as s:
        put_resource(s, {"resourceType": "Patient", "id": "a"}, if_match=1)
    assert get_resource(store, "Patient", "a")["gender"] == "female"
    with store.session() as s:
        assert s.query(FhirResourceVersion).filter_by(id="a").count() == 2
    with pytest.raises(ResourceNotFoundError):
        get_resource(store, "Patient", "missing")


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


def test_a_record_that_never_goes_quiet_is_due_at_its_maximum_wait(store: Store) -> None:
    now = time.time()
    with store.session() as s:
        Store.touch(s, "patient", "p-1", at=now - 100)  # the first change, 100 s ago
        Store.touch(s, "patient", "p-1", at=now - 2)  # and more every few seconds since
    assert store.due_trackers("patient", quiet_seconds=30) == []  # never quiet for 30 s
    assert store.due_trackers("patient", quiet_seconds=30, max_wait_seconds=300) == []
    (due,) = store.due_trackers("patient", quiet_seconds=30, max_wait_seconds=60)
    with store.session() as s:
        assert Store.claim_tracker(s, due)
    # the next change after the announcement starts a new wait: not due at once
    with store.session() as s:
        Store.touch(s, "patient", "p-1", at=now)
    assert store.due_trackers("patient", quiet_seconds=30, max_wait_seconds=60) == []


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
                put_resources(s, resources, [None] * len(resources))
        deadline = time.monotonic() + 10
        while database.stat().st_size < before + 8_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert database.stat().st_size >= before + 8_000_000
        assert get_resource(store, "Basic", "9-199")["code"] == note
    finally:
        store.stop()
        store.stop()  # stopping twice changes nothing


def test_an_instance_whose_query_values_postgresql_refuses_is_stored_without_them(
    postgres_url: str, tmp_path: Path
) -> None:
    """A value the driver refuses (here a description too long for its column, NUL in a name) must
    not keep the instance out: answered 0xA700 the sender would retry it for ever, and the receive
    journal's row writer would hold it back. Its row goes in with the UIDs and the file's place only."""
    store = Store(postgres_url)
    store.start()
    try:
        def row(uid: str) -> dict[str, object]:
            columns = (c.key for c in DicomInstance.__table__.columns if c.key not in ("dicom_json", "received_at"))
            return {**dict.fromkeys(columns),
                    "sop_instance_uid": uid, "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "modality": "CT", "patient_id": "P1", "is_image": True, "path": str(tmp_path / f"{uid}.dcm"),
                    "size": 10, "received_at": utcnow(), "study_description": "x" * 100, "patient_name": "Doe\x00^John"}

        placed: list[str] = []
        assert store.add_instance(row("1.2.3.4.1"), place_file=lambda: placed.append("1.2.3.4.1"))
        assert store.add_instances([row("1.2.3.4.2")]) == [True]
        for uid in ("1.2.3.4.1", "1.2.3.4.2"):
            kept = store.get_instance(uid)
            assert kept is not None and kept.path == str(tmp_path / f"{uid}.dcm")
            assert (kept.study_description, kept.patient_name, kept.modality) == (None, None, None)
        assert placed == ["1.2.3.4.1"], "the file was placed once, by the attempt that committed"
        # a batch is refused whole (the row writer then writes it row by row): nothing of it goes in
        with pytest.raises(StoreUnavailableError):
            store.add_instances([row("1.2.3.4.3"), row("1.2.3.4.4")])
        assert store.get_instance("1.2.3.4.3") is None
    finally:
        store.stop()


def test_a_store_started_on_its_own_has_every_table(tmp_path: Path) -> None:
    """In a fresh interpreter (this one has imported everything): the delivery queue's tables exist
    though nothing imported its modules before the store started."""
    import subprocess
    import sys

    code = ("import sys; from integration.db.store import Store; from sqlalchemy import inspect; "
            "s = Store(sys.argv[1]); s.start(); print(sorted(inspect(s.engine).get_table_names())); s.stop()")
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'alone.db'}"], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[3], check=True).stdout
    for table in ("delivery_jobs", "artifacts", "upstream_reports", "dicom_instances", "fhir_resources"):
        assert f"'{table}'" in out


def test_postgresql_connections_lost_while_idle_are_replaced_before_use(postgres_url: str) -> None:
    """A pooled connection can die while idle (a server restart, an idle timeout, a failover). One idle
    longer than PING_AFTER_IDLE_S is pinged when taken from the pool and replaced if dead, so the next
    requests are answered; one back from use more recently is not pinged (a round trip saved)."""
    import psycopg
    from sqlalchemy import text

    from integration.db.store import PING_AFTER_IDLE_S

    store = Store(postgres_url)
    store.start()
    try:
        with ExitStack() as stack:  # three connections in the pool
            for s in [stack.enter_context(store.read_session()) for _ in range(3)]:
                assert s.execute(text("SELECT 1")).scalar() == 1
        with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as admin:
            ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
        assert ended is not None and ended[0] >= 3
        time.sleep(PING_AFTER_IDLE_S + 0.2)
        for _ in range(5):  # each checkout finds a dead connection or a new one: all are answered
            with store.read_session() as s:
                assert s.execute(text("SELECT 1")).scalar() == 1
            with store.session() as s:
                assert s.execute(text("SELECT 1")).scalar() == 1
    finally:
        store.stop()
