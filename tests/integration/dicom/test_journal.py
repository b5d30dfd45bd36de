"""The receive journal: what was acknowledged survives a crash that loses files or rows.

A crash is simulated the way it looks afterwards: the process stops without a checkpoint, and
the file system or the database has lost what had not reached stable storage (an instance file,
a committed row). The next start replays the journal and restores both.
"""

from __future__ import annotations

import os
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import delete, select

from integration.db.store import Store
from integration.db.tables import DicomInstance
from integration.dicom.ingest.instances import InstanceIngest
from integration.dicom.ingest.journal import JournalRecord, ReceiveJournal
from integration.dicom.network.listener import part10_bytes
from integration.phi import folder_name


def ct_instances(n: int) -> list[tuple[str, bytes, bytes]]:
    """(SOP Instance UID, data set bytes, Part 10 bytes) of n copies of CT_small in one study."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    syntax = str(ds.file_meta.TransferSyntaxUID)
    out = []
    for _ in range(n):
        ds.SOPInstanceUID = generate_uid()
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        data = fp.getvalue()
        out.append((str(ds.SOPInstanceUID), data, part10_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax,
                                                                 "TEST", data)))
    return out


SYNTAX = "1.2.840.10008.1.2.1"


def journal_record(journal: ReceiveJournal, name: str, payload: bytes) -> None:
    with journal.covering(name, payload) as durable:
        durable()  # the caller would place the file and commit its row here


def test_journal_replays_unchecked_records_in_order_and_ignores_a_torn_tail(tmp_path: Path) -> None:
    journal = ReceiveJournal(tmp_path, segment_bytes=1 << 20)
    assert list(journal.open()) == []
    journal_record(journal, "a/1.dcm", b"first")
    journal_record(journal, "a/2.dcm", b"second" * 1000)
    # a crash in the middle of the next record: its bytes are partly there, it was never acknowledged
    end = journal._offset
    os.pwrite(journal._fd, b"MBJR" + b"\x01" * 20, end)
    journal.close()

    reopened = ReceiveJournal(tmp_path, segment_bytes=1 << 20)
    assert list(reopened.open()) == [("a/1.dcm", b"first"), ("a/2.dcm", b"second" * 1000)]
    reopened.checkpoint()
    journal_record(reopened, "b/3.dcm", b"third")
    reopened.close()

    # after a checkpoint the older records are gone, though their bytes are still in the segment
    again = ReceiveJournal(tmp_path, segment_bytes=1 << 20)
    assert list(again.open()) == [("b/3.dcm", b"third")]
    again.close()


def test_a_full_segment_is_recycled_after_syncing(tmp_path: Path) -> None:
    journal = ReceiveJournal(tmp_path, segment_bytes=64 << 10)
    list(journal.open())
    for i in range(40):  # 40 x 4 KiB does not fit in 64 KiB: the segment is recycled on the way
        journal_record(journal, f"s/{i}.dcm", bytes([i]) * 4096)
    journal.close()
    replayed = list(ReceiveJournal(tmp_path, segment_bytes=64 << 10).open())
    assert replayed, "the records since the recycling are still journaled"
    assert [name for name, _ in replayed] == [f"s/{i}.dcm" for i in range(40 - len(replayed), 40)]
    assert all(payload == bytes([int(name[2:-4])]) * 4096 for name, payload in replayed)


def test_recycling_waits_for_instances_still_being_placed(tmp_path: Path) -> None:
    """A record may go only once its file is in place: the sync before recycling must cover it."""
    journal = ReceiveJournal(tmp_path, segment_bytes=16 << 10)
    list(journal.open())
    second_done = threading.Event()

    def second_writer() -> None:
        journal_record(journal, "s/2.dcm", b"y" * 10_000)  # does not fit beside the first: recycles
        second_done.set()

    with journal.covering("s/1.dcm", b"x" * 10_000) as durable:
        durable()
        writer = threading.Thread(target=second_writer)
        writer.start()
        assert not second_done.wait(0.3), "recycled while the first instance was not yet in place"
    assert second_done.wait(5)
    writer.join()
    journal.close()
    assert [name for name, _ in ReceiveJournal(tmp_path, segment_bytes=16 << 10).open()] == ["s/2.dcm"]


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_restart_after_a_crash_restores_lost_files_and_lost_rows(store: Store, tmp_path: Path) -> None:
    storage = tmp_path / "dicom"
    ingest = InstanceIngest(store, storage, journal=ReceiveJournal(storage / ".journal", 1 << 20))
    ingest.recover()
    sent = ct_instances(3)
    for sop_uid, data, part10 in sent:
        assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid).status == 0x0000
    ingest.journal.close()  # type: ignore[union-attr]  # the process dies: no checkpoint

    (lost_file_uid, _, lost_file_bytes), (lost_row_uid, _, _), (kept_uid, _, _) = sent
    lost_file = Path(store.get_instance(lost_file_uid).path)  # type: ignore[union-attr]
    lost_file.unlink()
    with store.session() as s:
        s.execute(delete(DicomInstance).where(DicomInstance.sop_instance_uid == lost_row_uid))

    restarted = InstanceIngest(store, storage, journal=ReceiveJournal(storage / ".journal", 1 << 20))
    assert restarted.recover() == 2
    assert lost_file.read_bytes() == lost_file_bytes
    with store.session() as s:
        held = set(s.scalars(select(DicomInstance.sop_instance_uid)))
    assert held == {lost_file_uid, lost_row_uid, kept_uid}
    restored_row = store.get_instance(lost_row_uid)
    assert restored_row is not None and Path(restored_row.path).read_bytes() == sent[1][2]
    # recovered and checkpointed: a second restart has nothing to do
    restarted.journal.close()  # type: ignore[union-attr]
    assert InstanceIngest(store, storage, journal=ReceiveJournal(storage / ".journal", 1 << 20)).recover() == 0


def test_a_journal_of_another_size_is_replayed_then_resized(tmp_path: Path) -> None:
    small = ReceiveJournal(tmp_path, segment_bytes=1 << 20)
    list(small.open())
    journal_record(small, "a/1.dcm", b"kept across the resize")
    small.close()  # crash, then MEDBRIDGE_DICOM_JOURNAL_BYTES is raised
    larger = ReceiveJournal(tmp_path, segment_bytes=2 << 20)
    assert list(larger.open()) == [("a/1.dcm", b"kept across the resize")]
    larger.checkpoint()
    assert larger.path.stat().st_size == 2 << 20
    journal_record(larger, "a/2.dcm", b"x" * (1 << 20) + b"beyond the old size")
    larger.close()
    assert [n for n, _ in ReceiveJournal(tmp_path, segment_bytes=2 << 20).open()] == ["a/2.dcm"]


def test_a_journal_cut_short_while_being_created_is_created_again(tmp_path: Path) -> None:
    (tmp_path / "receive.journal").write_bytes(bytes(4096))  # zero-filling stopped before the header
    journal = ReceiveJournal(tmp_path, segment_bytes=1 << 20)
    assert list(journal.open()) == []
    journal_record(journal, "a/1.dcm", b"after")
    journal.close()
    assert list(ReceiveJournal(tmp_path, segment_bytes=1 << 20).open()) == [("a/1.dcm", b"after")]


def deferring_ingest(store: Store, storage: Path) -> InstanceIngest:
    ingest = InstanceIngest(store, storage, journal=ReceiveJournal(storage / ".journal", 1 << 20))
    ingest.recover()
    return ingest


def held_uids(store: Store) -> set[str]:
    with store.session() as s:
        return set(s.scalars(select(DicomInstance.sop_instance_uid)))


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_rows_written_after_the_answer_are_restored_after_a_crash_before_them(store: Store, tmp_path: Path) -> None:
    """Storage associations are answered once the instance is journaled and in place; its row is
    written after. A crash in between loses the rows, never the instances."""
    storage = tmp_path / "dicom"
    ingest = deferring_ingest(store, storage)
    sent = ct_instances(3)
    for sop_uid, data, part10 in sent:
        outcome = ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True)
        assert outcome.status == 0x0000 and outcome.stored
    assert held_uids(store) == set()  # answered, rows not written yet
    ingest.journal.close()  # type: ignore[union-attr]  # the process dies before the row writer ran

    restarted = deferring_ingest(store, storage)
    assert held_uids(store) == {sop_uid for sop_uid, _, _ in sent}
    for sop_uid, _, part10 in sent:
        assert Path(store.get_instance(sop_uid).path).read_bytes() == part10  # type: ignore[union-attr]
    restarted.close()
    assert deferring_ingest(store, storage).recover() == 0  # recovered and checkpointed


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_instances_journaled_before_they_are_read_are_restored_and_refused_ones_stay_refused(
    store: Store, tmp_path: Path
) -> None:
    """Storage associations journal an instance before its facts are read (its record names no
    file). A crash after the answers, which took the rows and the unsynced files, is repaired from
    the bytes alone: each answered instance goes back where ingest put it, and instances that were
    refused (a SOP Instance UID that disagrees with the C-STORE's, a truncated data set) are not
    stored by the replay either."""
    storage = tmp_path / "dicom"
    ingest = deferring_ingest(store, storage)
    (kept, kept_data, kept_part10), (other, other_data, other_part10), (refused, refused_data, _) = ct_instances(3)
    for sop_uid, data, part10 in ((kept, kept_data, kept_part10), (other, other_data, other_part10)):
        assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True).stored
    wrong_uid = generate_uid()  # the C-STORE's Affected SOP Instance UID, not the data set's
    mismatched = part10_bytes("1.2.840.10008.5.1.4.1.1.2", wrong_uid, SYNTAX, "TEST", refused_data)
    assert ingest.ingest_data_set(refused_data, SYNTAX, mismatched, expected_sop_uid=wrong_uid,
                                  defer_row=True).status == 0xC211
    cut = refused_data[: len(refused_data) - 1000]
    truncated = part10_bytes("1.2.840.10008.5.1.4.1.1.2", refused, SYNTAX, "TEST", cut)
    assert ingest.ingest_data_set(cut, SYNTAX, truncated, expected_sop_uid=refused, defer_row=True).status == 0xC210
    ingest.journal.close()  # type: ignore[union-attr]  # the process dies before the row writer ran
    for path in storage.glob("*/*.dcm"):
        path.unlink()  # and the files written had not reached the disk

    restarted = deferring_ingest(store, storage)
    assert held_uids(store) == {kept, other}
    for sop_uid, part10 in ((kept, kept_part10), (other, other_part10)):
        assert Path(store.get_instance(sop_uid).path).read_bytes() == part10  # type: ignore[union-attr]
    study_folder = storage / folder_name(str(dcmread(BytesIO(kept_part10)).StudyInstanceUID))
    assert sorted(storage.glob("*/*.dcm")) == sorted(study_folder / f"{uid}.dcm" for uid in (kept, other))
    restarted.close()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_file_that_cannot_be_written_after_the_answer_waits_in_the_journal_and_is_retried(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the journal's sync is done before the scanner (a fast disk: forced here), the file is
    written after the answer. One that cannot be written then (a folder stands where it must go)
    keeps its record and row waiting, instances meanwhile commit before their answer, and the retry
    places the file and its row once it can."""
    monkeypatch.setattr(JournalRecord, "is_durable", lambda self: True)
    storage = tmp_path / "dicom"
    ingest = deferring_ingest(store, storage)
    assert ingest.rows is not None
    ingest.rows.retry_seconds = 0.1
    (first, first_data, first_part10), (second, second_data, second_part10) = ct_instances(2)
    assert ingest.ingest_data_set(first_data, SYNTAX, first_part10, expected_sop_uid=first, defer_row=True).stored
    final = storage / folder_name(str(dcmread(BytesIO(first_part10)).StudyInstanceUID)) / f"{first}.dcm"
    assert final.parent.is_dir() and not final.exists()  # answered; written after the answer
    final.mkdir()
    ingest.write_rows()  # what the association does after its answer
    assert ingest.rows.failing and held_uids(store) == set()
    assert ingest.ingest_data_set(second_data, SYNTAX, second_part10, expected_sop_uid=second, defer_row=True).stored
    assert held_uids(store) == {second}  # committed before its answer
    final.rmdir()
    deadline = time.monotonic() + 10
    while held_uids(store) != {first, second} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_uids(store) == {first, second} and final.read_bytes() == first_part10
    assert not ingest.rows.failing
    ingest.close()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_journal_that_cannot_be_written_answers_out_of_resources(store: Store, tmp_path: Path) -> None:
    """The journal's file fails under it (its descriptor closed: every write then fails, as on a
    failed disk): a C-STORE is answered 0xA700, not left without an answer, and nothing is stored."""
    ingest = deferring_ingest(store, tmp_path / "dicom")
    assert ingest.journal is not None
    ((sop_uid, data, part10),) = ct_instances(1)
    os.close(ingest.journal._fd)
    try:
        assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True).status == 0xA700
        assert held_uids(store) == set() and not list((tmp_path / "dicom").glob("*/*.dcm"))
    finally:
        ingest.journal._fd = os.open(os.devnull, os.O_RDONLY)  # for close() to close
        ingest.journal.close()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_row_the_database_refuses_on_its_own_is_set_aside_and_the_others_go_in(store: Store, tmp_path: Path) -> None:
    """The database refuses one row of a batch (a real SQLite error, raised by a trigger for one SOP
    Instance UID): the other rows are committed, new instances are still answered on the fast path,
    and the refused row is retried until it goes in."""
    ingest = deferring_ingest(store, tmp_path / "dicom")
    assert ingest.rows is not None
    ingest.rows.retry_seconds = 0.1
    sent = ct_instances(4)
    refused = sent[1][0]
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TRIGGER refuse BEFORE INSERT ON dicom_instances WHEN NEW.sop_instance_uid = "
                             f"'{refused}' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    for sop_uid, data, part10 in sent[:3]:
        assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True).stored
    assert not ingest.flush_rows()  # one row is still out
    assert held_uids(store) == {sent[0][0], sent[2][0]} and not ingest.rows.failing
    sop_uid, data, part10 = sent[3]
    assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True).stored
    ingest.write_rows()
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse")
    deadline = time.monotonic() + 10
    while held_uids(store) != {uid for uid, _, _ in sent} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_uids(store) == {uid for uid, _, _ in sent}
    assert ingest.flush_rows()
    ingest.close()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_rows_wait_while_the_database_refuses_writes_and_go_in_once_it_takes_them(store: Store, tmp_path: Path) -> None:
    """The database refuses writes (a real SQLite error, raised by a trigger) after two instances
    were answered: their rows wait and are retried by the row writer's timer; meanwhile new
    instances are refused with 0xA700, so the sender keeps them."""
    ingest = deferring_ingest(store, tmp_path / "dicom")
    assert ingest.rows is not None
    ingest.rows.retry_seconds = 0.1
    (first, first_data, first_part10), (second, second_data, second_part10), (third, third_data, third_part10) = (
        ct_instances(3))
    for sop_uid, data, part10 in ((first, first_data, first_part10), (second, second_data, second_part10)):
        assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True).stored
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON dicom_instances "
                             "BEGIN SELECT RAISE(ABORT, 'database unavailable'); END")
    assert not ingest.flush_rows()
    assert ingest.ingest_data_set(third_data, SYNTAX, third_part10, expected_sop_uid=third,
                                  defer_row=True).status == 0xA700
    ingest.write_rows()  # what an association does after its answer: arms the retry
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse")
    deadline = time.monotonic() + 10
    while held_uids(store) != {first, second} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_uids(store) == {first, second}
    assert ingest.ingest_data_set(third_data, SYNTAX, third_part10, expected_sop_uid=third, defer_row=True).stored
    ingest.close()
    assert held_uids(store) == {first, second, third}


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_one_sop_instance_uid_under_other_studies_is_a_duplicate_of_the_first(store: Store, tmp_path: Path) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ingest = deferring_ingest(store, tmp_path / "dicom")
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = sop_uid = generate_uid()
    paths, stored = [], []
    for flush_between in (True, False, False):  # the first row committed, or still waiting
        ds.StudyInstanceUID = generate_uid()
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        part10 = part10_bytes(str(ds.SOPClassUID), sop_uid, SYNTAX, "TEST", fp.getvalue())
        outcome = ingest.ingest_data_set(fp.getvalue(), SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True)
        assert outcome.status == 0x0000
        stored.append(outcome.stored)
        paths.append(tmp_path / "dicom" / folder_name(str(ds.StudyInstanceUID)) / f"{sop_uid}.dcm")
        if flush_between:
            assert ingest.flush_rows()
    assert stored == [True, False, False]  # answered as duplicates (the listener's warning)
    assert ingest.flush_rows()
    row = store.get_instance(sop_uid)
    assert row is not None and row.path == str(paths[0])
    assert paths[0].exists() and not paths[1].exists() and not paths[2].exists()
    ingest.close()


def test_values_a_row_cannot_hold_are_refused_or_clipped_before_the_answer(store: Store, tmp_path: Path) -> None:
    """On both databases: a UID beyond 64 characters is refused (0xC211), an over-long Modality or
    Patient ID is clipped in its column (the file keeps it), so no row of a batch can fail its insert."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ingest = deferring_ingest(store, tmp_path / "dicom")

    def encoded(ds: Any) -> tuple[bytes, bytes]:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        return fp.getvalue(), part10_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), SYNTAX, "TEST", fp.getvalue())

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2." + "3" * 70
    data, part10 = encoded(ds)
    assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=str(ds.SOPInstanceUID),
                                  defer_row=True).status == 0xC211
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID = "CT" * 10, "P" * 80
    data, part10 = encoded(ds)
    assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=str(ds.SOPInstanceUID), defer_row=True).stored
    assert ingest.flush_rows()
    row = store.get_instance(str(ds.SOPInstanceUID))
    assert row is not None and row.modality == ("CT" * 10)[:16] and row.patient_id == "P" * 64
    assert dcmread(row.path).PatientID == "P" * 80
    ingest.close()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_replay_that_cannot_restore_an_instance_keeps_the_journal_for_the_next_start(
    store: Store, tmp_path: Path
) -> None:
    """An answered instance whose file and row a crash took, and which the replay cannot write back
    (its study folder is blocked): the start fails, saying why, and the journal is not checkpointed;
    once the folder is fixed, the next start restores the instance."""
    import shutil

    storage = tmp_path / "dicom"
    ingest = deferring_ingest(store, storage)
    ((sop_uid, data, part10),) = ct_instances(1)
    assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True).stored
    ingest.journal.close()  # type: ignore[union-attr]  # the process dies before the row writer ran
    (study_folder,) = [p for p in storage.iterdir() if p.is_dir() and not p.name.startswith(".")]
    shutil.rmtree(study_folder)  # the file had not reached the disk
    study_folder.write_bytes(b"in the way")  # and the folder cannot be made again

    blocked = InstanceIngest(store, storage, journal=ReceiveJournal(storage / ".journal", 1 << 20))
    with pytest.raises(OSError, match="the journal keeps it"):
        blocked.recover()
    blocked.journal.close()  # type: ignore[union-attr]
    assert held_uids(store) == set()

    study_folder.unlink()
    restarted = deferring_ingest(store, storage)
    assert held_uids(store) == {sop_uid}
    assert Path(store.get_instance(sop_uid).path).read_bytes() == part10  # type: ignore[union-attr]
    restarted.close()
