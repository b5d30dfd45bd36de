"""The receive journal under faults: failed syncs keep records, damaged records are skipped (not
trusted, not the end), restored files are checked by content, one process per journal file."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from integration.db.store import Store
from integration.dicom.ingest import journal as journal_module
from integration.dicom.ingest.journal import JournalInUseError, ReceiveJournal
from integration.dicom.network.listener import INGEST_STOPPED_COMMENT, DicomListener
from tests.integration.dicom.test_journal import SYNTAX, ct_instances, deferring_ingest, journal_record


class FailingOnce:
    """A syncfs(2) that fails with EIO the first time (a fault injection: a disk that reports a
    write-back error once), then succeeds."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> int:
        self.calls += 1
        if self.calls == 1:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0


def test_a_failed_checkpoint_sync_keeps_every_record_until_one_succeeds(tmp_path: Path) -> None:
    syncfs = FailingOnce()
    journal = ReceiveJournal(tmp_path, segment_bytes=1 << 20, syncfs=syncfs)
    list(journal.open())
    for i in range(3):
        journal_record(journal, f"a/{i}.dcm", bytes([i]) * 100)
    with pytest.raises(OSError, match="syncfs"):
        journal.checkpoint()
    assert journal.failure() is not None and "checkpoint" in journal.failure()  # type: ignore[operator]
    journal.close()  # the process stops here: the records must still be there

    reopened = ReceiveJournal(tmp_path, segment_bytes=1 << 20, syncfs=syncfs)
    assert [name for name, _ in reopened.open()] == ["a/0.dcm", "a/1.dcm", "a/2.dcm"]
    reopened.checkpoint()  # the disk works again
    assert reopened.failure() is None
    reopened.close()
    assert list(ReceiveJournal(tmp_path, segment_bytes=1 << 20).open()) == []


def test_a_damaged_record_is_skipped_and_the_records_after_it_are_replayed(tmp_path: Path) -> None:
    journal = ReceiveJournal(tmp_path, segment_bytes=1 << 20)
    list(journal.open())
    journal_record(journal, "a/1.dcm", b"first" * 10)
    second_at = journal._offset
    journal_record(journal, "a/2.dcm", b"second" * 10)
    journal_record(journal, "a/3.dcm", b"third" * 10)
    journal.close()
    # one payload byte of the second record flips (a damaged block)
    header = journal_module._RECORD_HEADER.size + len("a/2.dcm")
    with open(tmp_path / "receive.journal", "r+b") as fh:
        fh.seek(second_at + header + 3)
        byte = fh.read(1)
        fh.seek(second_at + header + 3)
        fh.write(bytes([byte[0] ^ 0xFF]))

    reopened = ReceiveJournal(tmp_path, segment_bytes=1 << 20)
    assert list(reopened.open()) == [("a/1.dcm", b"first" * 10), ("a/3.dcm", b"third" * 10)]
    assert reopened.skipped == 1
    reopened.close()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_replay_restores_a_file_whose_content_is_not_the_journaled_one(store: Store, tmp_path: Path) -> None:
    """A crash may leave an instance file of the right size with stale blocks: the replay compares
    its CRC with the record's, not just its size, and writes the acknowledged bytes back."""
    storage = tmp_path / "dicom"
    ingest = deferring_ingest(store, storage)
    sent = ct_instances(2)
    for sop_uid, data, part10 in sent:
        assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid, defer_row=True).stored
    assert ingest.flush_rows()
    ingest.journal.close()  # type: ignore[union-attr]  # dies before a checkpoint
    damaged = Path(store.get_instance(sent[0][0]).path)  # type: ignore[union-attr]
    content = bytearray(damaged.read_bytes())
    content[-10] ^= 0xFF  # same size, other bytes
    damaged.write_bytes(bytes(content))

    restarted = deferring_ingest(store, storage)
    assert damaged.read_bytes() == sent[0][2], "the journaled bytes are back"
    restarted.close()


def test_a_second_process_cannot_open_a_journal_in_use(tmp_path: Path) -> None:
    journal = ReceiveJournal(tmp_path, segment_bytes=1 << 20)
    list(journal.open())
    try:
        with pytest.raises(JournalInUseError, match=str(tmp_path / "receive.journal")):
            list(ReceiveJournal(tmp_path, segment_bytes=1 << 20).open())
        # and a real second process (a second MedBridge on the same volume)
        code = ("import sys; from pathlib import Path; from integration.dicom.ingest.journal import ReceiveJournal\n"
                "try:\n    list(ReceiveJournal(Path(sys.argv[1]), 1 << 20).open())\n"
                "except RuntimeError as exc:\n    print(exc); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
        assert proc.returncode == 3, proc.stderr
        assert "receive.journal is open in another process" in proc.stdout
    finally:
        journal.close()
    list(ReceiveJournal(tmp_path, segment_bytes=1 << 20).open())  # free once closed


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_failed_journal_sync_refuses_c_store_and_shows_in_the_ingest_check(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                             study_quiet_seconds=60, journal_bytes=4 << 20)
    listener.start()
    real_fdatasync = os.fdatasync
    failed = []

    def fdatasync_failing_once(fd: int) -> None:
        # fault injection: the disk reports an error for the journal's next data sync
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error (injected)")
        real_fdatasync(fd)

    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
        assert assoc.is_established
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        assert assoc.send_c_store(ds).Status == 0x0000
        assert listener.ingest.failure() is None
        monkeypatch.setattr(journal_module.os, "fdatasync", fdatasync_failing_once)
        statuses = []
        for _ in range(3):
            ds.SOPInstanceUID = generate_uid()
            statuses.append(assoc.send_c_store(ds))
        assoc.release()
        assert failed, "the injected fault was hit"
        assert [s.Status for s in statuses] == [0xA700] * 3, "never success while the journal is broken"
        assert statuses[-1].ErrorComment == INGEST_STOPPED_COMMENT
        failure = listener.ingest.failure()
        assert failure is not None and "sync failed" in failure
    finally:
        monkeypatch.undo()
        time.sleep(0.1)
        listener.stop()
