"""Durable ingest of one DICOM instance, shared by every way instances arrive (C-STORE, STOW-RS).

The instance is made durable before the caller answers success: journaled with one sync (see
``dicom_journal``), or written on its own (temp file, fsync, atomic rename, folder fsync). Its row
is recorded with the study's change tracker in one transaction before the answer or, for
storage-only associations (``defer_row``), just after it, in batches: the journal holds the
instance until its row is in, so a crash in between loses nothing (the replay writes the row).
The answer is a DICOM status (PS3.4 Annex B.2.3), which STOW-RS maps onto HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from integration.datadir import open_private, private_folder
from integration.db.store import Store
from integration.db.tables import utcnow
from integration.dicom.ingest.journal import JournalInUseError, JournalRecord, ReceiveJournal
from integration.dicom.ingest.limits import TOO_LARGE_COMMENT, InstanceTooLargeError, inflate_within
from integration.dicom.ingest.scan import InstanceFacts, facts_from_dataset, scan_facts
from integration.dicom.query import INT32_LIMIT, STORABLE_UID
from integration.errors import StoreUnavailableError
from integration.phi import folder_name, uid_hash

log = logging.getLogger(__name__)

# C-STORE statuses MedBridge answers with (PS3.4 Annex B.2.3 and pynetdicom's doc_handle_store)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # disk full, read-only folder, store down: the sender should retry later
STATUS_CANNOT_UNDERSTAND = 0xC210  # the data set could not be parsed (truncated, malformed)
STATUS_IDENTIFIER_MISSING = 0xC211  # parsed, but a required UID is missing or disagrees with the command
# MEDBRIDGE_DICOM_MAX_INSTANCE_BYTES' default: larger than any single-frame image and most multi-frame
# ones (a 2,000-slice 512x512 CT is 1 GB), small enough that a few at once fit in a server's memory
DEFAULT_MAX_INSTANCE_BYTES = 1 << 30

@dataclass(frozen=True)
class IngestOutcome:
    status: int
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    stored: bool = False  # False for a duplicate (first kept) and for every failure
    comment: str | None = None  # an Error Comment for the sender, where the status alone does not say why


class InstanceIngest:
    """Checks, writes and records instances under ``storage_dir``; thread-safe."""

    def __init__(
        self, store: Store, storage_dir: Path, *, min_free_bytes: int = 0, journal: ReceiveJournal | None = None,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    ) -> None:
        self.store = store
        # the largest data set taken, as sent and (deflated ones) inflated: 0xA700 above it
        self.max_instance_bytes = max_instance_bytes
        self.storage_dir = storage_dir
        self.min_free_bytes = min_free_bytes
        # with a journal, an instance is durable once journaled and its file is written without syncs
        self.journal = journal
        # rows of journaled instances answered before their row is in (``defer_row``)
        self.rows = _RowWriter(store) if journal is not None else None
        if journal is not None:
            # a full journal recycles only once every journaled row is in: this commits them
            journal.before_recycle = self.flush_rows
        self._free_checked_at = 0.0
        self._free_ok = True

    def has_free_space(self) -> bool:
        """False once free space under the storage folder is below the floor (checked at most once a second)."""
        now = time.monotonic()
        if now - self._free_checked_at > 1.0:
            self._free_checked_at = now
            try:
                self._free_ok = shutil.disk_usage(self.storage_dir).free >= self.min_free_bytes
            except OSError:
                self._free_ok = False
        return self._free_ok

    def ingest(
        self, ds: Any, part10: bytes, *, transfer_syntax: str | None = None, expected_sop_uid: str | None = None,
        journaled: bool = True, record: JournalRecord | None = None,
    ) -> IngestOutcome:
        """Store one instance: ``ds`` is its parsed data set, ``part10`` the file bytes.

        ``transfer_syntax`` is the one the data set was received in (default: ``ds.file_meta``'s).
        Statuses as for :meth:`ingest_facts`, plus 0xC210 when the data set cannot be parsed and
        0xC211 when a required UID is missing.
        """
        try:
            syntax = str(transfer_syntax or ds.file_meta.TransferSyntaxUID)
            facts = facts_from_dataset(ds, UID(syntax))
        except AttributeError:
            log.warning("instance refused: required UID missing")
            return IngestOutcome(STATUS_IDENTIFIER_MISSING)
        except Exception as exc:  # noqa: BLE001 - any parse failure of peer bytes means "cannot understand"
            log.warning("instance refused: data set cannot be parsed (%s)", type(exc).__name__)
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND)
        return self.ingest_facts(facts, part10, transfer_syntax=syntax, expected_sop_uid=expected_sop_uid,
                                 journaled=journaled, record=record)

    def ingest_data_set(
        self, data_set: bytes, transfer_syntax: str, part10: bytes, *, expected_sop_uid: str | None = None,
        defer_row: bool = False,
    ) -> IngestOutcome:
        """Store one instance received as data set bytes (what a C-STORE carries) in ``transfer_syntax``.

        The byte scanner reads what ingest needs; only what it declines is parsed by pydicom.
        ``defer_row``: answer once the instance is journaled and in place, and leave its row to the
        row writer (visible within ``_RowWriter.linger_seconds``; :meth:`flush_rows` waits for it);
        the instance is journaled before its facts are read, so the disk flush, the largest cost of
        a C-STORE here, runs while the scanner works. Where it cannot be journaled (no journal, too
        large, rows waiting for the database) its row is committed before the answer instead.
        """
        if len(data_set) > self.max_instance_bytes:
            log.warning("instance refused: %d bytes, above MEDBRIDGE_DICOM_MAX_INSTANCE_BYTES", len(data_set))
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, comment=TOO_LARGE_COMMENT)
        record = self._journal_unread(part10) if defer_row else None
        try:
            outcome = self._ingest_data_set(data_set, _syntax_uid(transfer_syntax), part10, expected_sop_uid, record)
        except BaseException:
            if record is not None:
                record.settle()
            raise
        if record is not None and not outcome.stored:
            record.settle()  # refused or a duplicate: replaying the record refuses or skips it again
        return outcome

    def _ingest_data_set(
        self, data_set: bytes, syntax: UID, part10: bytes, expected_sop_uid: str | None, record: JournalRecord | None,
    ) -> IngestOutcome:
        facts = scan_facts(data_set, syntax)
        if facts is not None:
            return self.ingest_facts(facts, part10, transfer_syntax=str(syntax), expected_sop_uid=expected_sop_uid,
                                     record=record)
        try:
            if syntax.is_deflated:
                # inflated here within the limit (pydicom would inflate whatever it is given), then read
                ds = decode(BytesIO(inflate_within(data_set, self.max_instance_bytes)), False, True, False)
            else:
                ds = decode(BytesIO(data_set), syntax.is_implicit_VR, syntax.is_little_endian, False)
        except InstanceTooLargeError as exc:
            log.warning("instance refused: %s", exc)
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, comment=TOO_LARGE_COMMENT)
        except Exception as exc:  # noqa: BLE001 - any parse failure of peer bytes means "cannot understand"
            log.warning("instance refused: data set cannot be parsed (%s)", type(exc).__name__)
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND)
        return self.ingest(ds, part10, transfer_syntax=str(syntax), expected_sop_uid=expected_sop_uid, record=record)

    def _journal_unread(self, part10: bytes) -> JournalRecord | None:
        """The journal record of an instance whose facts are not read yet (it names no file: a replay
        reads the bytes to find where it goes), or None where its row must be committed before the
        answer: no journal, too large for it, or earlier rows waiting for the database."""
        journal = self.journal
        if journal is None or self.rows is None or self.rows.failing or len(part10) > journal.largest_record():
            return None
        if not self.has_free_space():
            return None  # refused below, and not journaled
        try:
            return journal.append(_UNPLACED, part10)
        except OSError:
            return None  # a journal that cannot take it (full of waiting rows, a failed sync): 0xA700 below

    def ingest_facts(
        self, facts: InstanceFacts, part10: bytes, *, transfer_syntax: str, expected_sop_uid: str | None = None,
        journaled: bool = True, record: JournalRecord | None = None,
    ) -> IngestOutcome:
        """Check, write and record one instance whose facts are read; ``journaled=False`` writes it
        durably on its own (what replaying a journal does: it must not append to the journal it reads).
        ``record``: the instance is journaled already (``_journal_unread``): place its file and hand
        its row and record to the row writer (stored), or leave the record to the caller to settle.

        Status 0x0000 when the instance is durably stored (or was already held: keep first),
        0xC210 when an element is truncated, 0xC211 when the SOP Instance UID disagrees with
        ``expected_sop_uid`` (the C-STORE request's), 0xA700 when the disk or the database
        cannot take it, or free space is below the configured floor.
        """
        sop_uid, study_uid = facts.sop_instance_uid, facts.study_instance_uid
        if facts.truncated is not None:
            log.warning("instance %s refused: element %s is truncated", uid_hash(sop_uid), facts.truncated)
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, sop_uid, study_uid)
        if expected_sop_uid is not None and sop_uid != expected_sop_uid:
            return IngestOutcome(STATUS_IDENTIFIER_MISSING, sop_uid, study_uid)
        uids = (sop_uid, study_uid, facts.series_instance_uid, facts.sop_class_uid)
        if any(len(uid) > _UID_MAX for uid in uids):
            # PS3.5 9.1; refused here, so that no row can fail its insert (a batch of rows would wait on it)
            log.warning("instance %s refused: a UID is longer than 64 characters", uid_hash(sop_uid))
            return IngestOutcome(STATUS_IDENTIFIER_MISSING, sop_uid, study_uid)
        if any(not STORABLE_UID.fullmatch(uid) for uid in uids):
            # the SOP Instance UID names the file: a '/' would put it outside the storage folder, and
            # PostgreSQL refuses NUL in text (see STORABLE_UID for what is let through, and why)
            log.warning("instance %s refused: a UID holds a character no UID may hold", uid_hash(sop_uid))
            return IngestOutcome(STATUS_IDENTIFIER_MISSING, sop_uid, study_uid)
        if not self.has_free_space():
            # refuse before the disk is full, so the sender keeps the instance and retries later
            log.error("instance %s refused: free space below MEDBRIDGE_MIN_FREE_BYTES", uid_hash(sop_uid))
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, sop_uid, study_uid)
        final = self._final_path(facts)
        folder = final.parent
        tmp = folder / f".{sop_uid}.{threading.get_ident()}.tmp"
        values = {
            "sop_instance_uid": sop_uid,
            "study_instance_uid": study_uid,
            "series_instance_uid": facts.series_instance_uid,
            "sop_class_uid": facts.sop_class_uid,
            "transfer_syntax_uid": transfer_syntax,
            # the file keeps the values as sent; the columns, for matching, hold what fits (as index_fields does)
            "modality": (facts.modality or "")[:16] or None,
            "patient_id": (facts.patient_id or "")[:64] or None,
            "is_image": facts.is_image,
            "path": str(final),
            "size": len(part10),
            **facts.index,
        }
        _fit_columns(values)
        journal = self.journal if journaled and self.journal is not None else None
        if journal is not None and len(part10) > journal.largest_record():
            journal = None
        if record is None and self.rows is not None and self.rows.claims(sop_uid):
            log.info("duplicate instance %s: the first is kept", uid_hash(sop_uid))
            return IngestOutcome(STATUS_SUCCESS, sop_uid, study_uid, stored=False)  # its row is on its way
        try:
            if record is not None:
                stored = self._place_then_defer_row(record, final, part10, values)
            elif journal is not None:
                # the file first: a folder that cannot take it answers 0xA700 with nothing journaled
                _write(tmp, part10)
                with journal.covering(f"{folder.name}/{final.name}", part10) as durable:

                    def place_after_sync() -> None:
                        # the row's insert ran while the record was written back; durable before the commit
                        durable()
                        os.replace(tmp, final)

                    stored = self.store.add_instance(values, place_file=place_after_sync)
            else:
                _write_durably(tmp, part10)
                stored = self.store.add_instance(values, place_file=lambda: _rename_durably(tmp, final))
        except (OSError, StoreUnavailableError) as exc:
            log.error("instance %s not stored: %s", uid_hash(sop_uid), type(exc).__name__)
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, sop_uid, study_uid)
        finally:
            if record is None:  # a journaled instance is written to its final path, never to tmp
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)  # already renamed, or never written
        if stored:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("stored instance %s of study %s", uid_hash(sop_uid), uid_hash(study_uid))
        else:
            log.info("duplicate instance %s: the first is kept", uid_hash(sop_uid))
        return IngestOutcome(STATUS_SUCCESS, sop_uid, study_uid, stored)

    def _place_then_defer_row(self, record: JournalRecord, final: Path, part10: bytes, values: dict[str, Any]) -> bool:
        """Wait until ``record`` is durable and hand the row, the record and (unless written already)
        the file to the row writer; False for a duplicate (the first is kept): its SOP Instance UID
        is recorded, or waits for its row. The file is written here while the journal is still
        syncing (it costs the answer nothing then), else after the answer (``write_rows``). A file
        has no row pointing at it until it is written, so nothing reads it half-written; one left
        by a crash (no row) is overwritten."""
        assert self.rows is not None
        sop_uid = values["sop_instance_uid"]
        if not self.rows.reserve(sop_uid):
            return False  # placed already by another association; its row is on its way
        try:
            if self.store.holds_instance(sop_uid):  # held (possibly under another study): keep the first
                self.rows.release(sop_uid)
                return False
            unwritten: tuple[Path, bytes] | None = (final, part10)
            try:
                if not record.is_durable():
                    _write(final, part10)  # the journal's syncer runs meanwhile
                    unwritten = None
                elif not final.parent.is_dir():
                    private_folder(final.parent)  # a file in its way answers 0xA700
                record.durable()
            except BaseException:
                with contextlib.suppress(OSError):
                    final.unlink()  # ours, or an orphan: no row points at it
                raise
        except BaseException:
            self.rows.release(sop_uid)
            raise
        self.rows.submit({**values, "received_at": utcnow()}, record, unwritten)
        return True

    def _final_path(self, facts: InstanceFacts) -> Path:
        return self.storage_dir / folder_name(facts.study_instance_uid) / f"{facts.sop_instance_uid}.dcm"

    def write_rows(self) -> None:
        """Write the files of instances already answered (``defer_row``) and commit their rows if
        enough are waiting, or for long enough; call once an answer is sent."""
        if self.rows is not None:
            self.rows.write_due()

    def flush_rows(self) -> bool:
        """Commit every row of an instance answered so far; False while the database is down (the
        journal keeps those instances)."""
        return self.rows.write_pending() if self.rows is not None else True

    def failure(self) -> str | None:
        """Why instances are refused now (0xA700), or None: a journal sync failed, or rows of
        instances already answered wait for the database or the storage folder."""
        reason = self.journal.failure() if self.journal is not None else None
        if reason is None and self.rows is not None and self.rows.failing:
            reason = "rows of received instances wait for the database or the storage folder"
        return reason

    def close(self) -> None:
        """Write the pending rows, checkpoint the journal (unless rows could not be written: the next
        start replays it) and close it."""
        if self.journal is None:
            return
        assert self.rows is not None
        flushed = self.flush_rows()
        self.rows.close()
        if flushed:
            try:
                self.journal.checkpoint()
            except OSError:
                log.error("the receive journal keeps its records for the next start (its checkpoint failed)")
        else:
            log.error("rows of received instances could not be written; the receive journal keeps them "
                      "for the next start")
        self.journal.close()

    def recover(self) -> int:
        """Open the journal and restore what a crash may have lost since its last checkpoint:
        instance files missing or cut short, and rows the database did not keep (SQLite's WAL with
        synchronous=NORMAL may roll back the last commits on a power cut). Returns how many
        instances were restored; the journal is checkpointed afterwards."""
        return self._replay(self.journal) if self.journal is not None else 0

    def recover_others(self) -> int:
        """Replay and checkpoint the other journals beside this one (listener processes that ran
        before and will not start again); call before those processes start."""
        if self.journal is None or not self.journal.folder.exists():
            return 0
        restored = 0
        for other in self.journal.siblings():
            try:
                restored += self._replay(other)
            except JournalInUseError:
                # a listener process still running (another MedBridge on this folder): it is its own
                log.warning("receive journal %s is open in another process; not replayed here", other.path.name)
            finally:
                other.close()
        return restored

    def _replay(self, journal: ReceiveJournal) -> int:
        restored = sum(self._restore(self.storage_dir / relative, part10) if relative != _UNPLACED
                       else self._restore_unplaced(part10) for relative, part10 in journal.open())
        journal.checkpoint()
        if restored:
            log.warning("restored %d instance(s) from the receive journal after an unclean stop", restored)
        return restored

    def _restore_unplaced(self, part10: bytes) -> bool:
        """A record journaled before the instance's facts were read (``_journal_unread``): the file
        goes where ingest puts it, if the instance was taken at all. One that was refused is refused
        again: every refusal but 0xA700 follows from the bytes, and the C-STORE's SOP Instance UID is
        the File Meta Information's. (One refused 0xA700 is stored now; its retry is a duplicate.)"""
        try:
            ds = dcmread(BytesIO(part10))
            syntax = str(ds.file_meta.TransferSyntaxUID)
            final = self._final_path(facts_from_dataset(ds, UID(syntax)))
            expected = str(ds.file_meta.MediaStorageSOPInstanceUID)
        except Exception:  # noqa: BLE001 - bytes the C-STORE was refused for (0xC210, 0xC211)
            return False
        return self._restore(final, part10, ds, expected_sop_uid=expected)

    def _restore(self, final: Path, part10: bytes, ds: Any = None, *, expected_sop_uid: str | None = None) -> bool:
        """``ds``: the bytes already parsed, if the caller did."""
        row = self.store.get_instance(final.stem)
        if row is None:
            # acknowledged but the row was lost: ingest again, from the journaled bytes
            ds = ds if ds is not None else dcmread(BytesIO(part10))
            outcome = self.ingest(ds, part10, transfer_syntax=str(ds.file_meta.TransferSyntaxUID), journaled=False,
                                  expected_sop_uid=expected_sop_uid)
            if outcome.status == STATUS_OUT_OF_RESOURCES:
                # the checkpoint after the replay would drop the only copy of an instance already answered
                raise OSError(f"instance {uid_hash(final.stem)} in the receive journal cannot be restored: the "
                              "storage folder or the database refuses it, or free space is below "
                              "MEDBRIDGE_MIN_FREE_BYTES (see the error above); the journal keeps it: fix that and "
                              "start again")
            return outcome.stored
        # a duplicate (kept first) has a record too: only bytes of the row's size are the row's; the
        # file is restored unless it holds exactly the journaled bytes (same size and CRC-32: a file
        # the crash left with the right size but stale blocks is not the acknowledged instance)
        if row.path == str(final) and row.size == len(part10) and not _holds(final, part10):
            tmp = final.with_name(f".{final.name}.restore")
            _write(tmp, part10)
            os.replace(tmp, final)
            return True
        return False


# a negotiated transfer syntax as pydicom's UID, built (and validated, by a regex) once per syntax, not per C-STORE
_syntax_uid = functools.lru_cache(maxsize=256)(UID)
_UID_MAX = 64  # characters of a UID (PS3.5 9.1), and of the store's UID columns


def _fit_columns(values: dict[str, Any]) -> None:
    """Make the row's query columns storable on every engine: PostgreSQL refuses NUL in text (which
    some devices pad or embed in strings) and integers beyond 32 bits (an IS value may have 12 digits).
    A row the database refuses would wait, set aside, with its instance already answered success; the
    file keeps the values as sent."""
    for column, value in values.items():
        if type(value) is str:
            if "\x00" in value:
                values[column] = value.replace("\x00", "") or None
        elif type(value) is int and not -INT32_LIMIT <= value < INT32_LIMIT:
            values[column] = None
_UNPLACED = ""  # the relative path of a record journaled before its instance's facts were read
_Entry = tuple[dict[str, Any], JournalRecord]  # a row waiting for its commit, and the journal record it settles


class _RowWriter:
    """The rows of instances already answered, committed in batches: by an association thread once
    its answer is sent (:meth:`write_due`) when ``batch_rows`` are waiting or the oldest has waited
    ``linger_seconds``, else by a timer armed for the stragglers. No thread waits on every row, so
    nothing competes with the receiving threads for the GIL per instance, and one commit covers
    dozens of instances from every association. Files not written before the answer are written
    first (by the association's thread, right after its answer). Each row's journal record is
    settled after its commit, so a checkpoint never drops an instance whose row is not in. While
    the database is down, or files cannot be written, they wait and are retried (``failing``: new
    instances take the path that commits before the answer, and are refused with 0xA700)."""

    def __init__(self, store: Store, *, batch_rows: int = 64, linger_seconds: float = 0.05,
                 retry_seconds: float = 1.0) -> None:
        self.store = store
        self.batch_rows = batch_rows
        self.linger_seconds = linger_seconds
        self.retry_seconds = retry_seconds
        self._database_failing = False
        self._files_failing = False
        self._closed = False
        self._first_pending_at = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # guards the pending rows and the counts
        self._writing = threading.Lock()  # one batch at a time
        self._pending: list[tuple[dict[str, Any], JournalRecord]] = []
        self._set_aside: list[tuple[dict[str, Any], JournalRecord]] = []  # rows the database refuses on their own
        self._unwritten: list[tuple[dict[str, Any], JournalRecord, tuple[Path, bytes]]] = []  # files first
        self._placed = threading.Condition(self._lock)
        self._placing: set[str] = set()  # SOP Instance UIDs being placed
        self._held: set[str] = set()  # placed, durable, and their rows not committed yet

    def reserve(self, sop_uid: str) -> bool:
        """Claim an instance about to be placed; False when it is placed already and its row waits.
        Another association placing the same instance right now is waited for: if it fails, this
        copy is the one to keep. ``release`` gives a claim up, ``submit`` hands in its row."""
        with self._lock:
            self._placed.wait_for(lambda: sop_uid not in self._placing)
            if sop_uid in self._held:
                return False
            self._placing.add(sop_uid)
            return True

    def claims(self, sop_uid: str) -> bool:
        """True while an instance of this SOP Instance UID is being placed or waits for its row."""
        with self._lock:
            return sop_uid in self._placing or sop_uid in self._held

    def release(self, sop_uid: str) -> None:
        with self._lock:
            self._placing.discard(sop_uid)
            self._placed.notify_all()

    @property
    def failing(self) -> bool:
        return self._database_failing or self._files_failing

    def submit(self, row: dict[str, Any], record: JournalRecord, unwritten: tuple[Path, bytes] | None = None) -> None:
        """Hand in a durable instance's row (and its file, when it is still to be written)."""
        sop_uid = row["sop_instance_uid"]
        with self._lock:
            if unwritten is not None:
                self._unwritten.append((row, record, unwritten))
            else:
                self._queue(row, record)
            self._placing.discard(sop_uid)
            self._held.add(sop_uid)
            self._placed.notify_all()

    def _queue(self, row: dict[str, Any], record: JournalRecord) -> None:
        """Under ``_lock``: a row whose file is in place."""
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append((row, record))

    def write_files(self) -> None:
        """Write the files handed in unwritten; on a failure they wait (``failing``) for the retry."""
        with self._lock:
            entries, self._unwritten = self._unwritten, []
        for done, (row, record, (path, data)) in enumerate(entries):
            try:
                _write(path, data)
            except OSError as exc:
                with self._lock:
                    self._unwritten[:0] = entries[done:]
                if not self._files_failing:
                    log.error("files of %d received instance(s) wait for the storage folder: %s",
                              len(entries) - done, type(exc).__name__)
                self._files_failing = True
                return
            with self._lock:
                self._queue(row, record)
        if entries:
            self._files_failing = False

    def write_due(self) -> None:
        """After an answer: write the files still to write, and the batch if it is full or old
        enough, else make sure a timer will."""
        self.write_files()
        with self._lock:
            due = bool(self._pending) and (len(self._pending) >= self.batch_rows or (
                time.monotonic() - self._first_pending_at >= self.linger_seconds))
        if due:
            self.write_pending(wait=False)
        self._arm_timer()

    def close(self) -> None:
        """No more timers (the rows still pending wait in the journal for the next start)."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _arm_timer(self) -> None:
        with self._lock:
            if self._timer is not None or not (self._pending or self._unwritten or self._set_aside) or self._closed:
                return
            retrying = self.failing or (self._set_aside and not self._pending)
            self._timer = threading.Timer(self.retry_seconds if retrying else self.linger_seconds, self._on_timer)
            self._timer.daemon = True
            self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
        self.write_pending()
        self._arm_timer()  # rows handed in meanwhile, or a database still down

    def write_pending(self, *, wait: bool = True) -> bool:
        """Write every file and commit every row handed in before the call; False when the database
        is down, files cannot be written, or rows are set aside (they wait). ``wait=False`` returns
        at once where another thread is writing a batch (it, or the next call, takes these rows),
        and leaves the rows set aside to the timer."""
        self.write_files()
        if not self._writing.acquire(blocking=wait):
            return not self.failing
        try:
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                self._write(batch)
            if wait and self._set_aside:
                self._retry_set_aside()
            return not self.failing and not self._set_aside
        finally:
            self._writing.release()

    def _write(self, batch: list[tuple[dict[str, Any], JournalRecord]]) -> None:
        rows = [row for row, _ in batch]
        try:
            added = self.store.add_instances(rows)
        except StoreUnavailableError as exc:
            if len(batch) > 1 and self._write_one_by_one(batch):
                return
            with self._lock:
                self._pending[:0] = batch  # kept, in order, for the next try
            if not self._database_failing:
                log.error("rows of %d received instance(s) wait for the database: %s", len(rows), exc)
            self._database_failing = True
            return
        self._database_failing = False
        self._settle(batch, added)

    def _settle(self, batch: list[tuple[dict[str, Any], JournalRecord]], added: list[bool]) -> None:
        for (row, record), new in zip(batch, added, strict=True):
            if not new:
                self._drop_unheld(row)
            record.settle()
        with self._lock:
            self._held.difference_update(row["sop_instance_uid"] for row, _ in batch)

    def _write_one_by_one(self, batch: list[tuple[dict[str, Any], JournalRecord]]) -> bool:
        """A batch the database refused, row by row: False when it refuses every row (it is down).
        Otherwise the rows it refuses on their own are set aside and retried every ``retry_seconds``,
        so that one row the database rejects does not hold every other instance back (their journal
        records wait with them: a journal full of them refuses new instances, 0xA700)."""
        refused = self._write_each(batch)
        if len(refused) == len(batch):
            return False
        self._database_failing = False
        with self._lock:
            self._set_aside.extend(refused)
        for row, _ in refused:
            log.error("the database refuses the row of received instance %s; retried every %.0f s (the journal "
                      "keeps the instance)", uid_hash(row["sop_instance_uid"]), self.retry_seconds)
        return True

    def _retry_set_aside(self) -> None:
        """Under ``_writing``: the rows set aside, each on its own again."""
        with self._lock:
            entries, self._set_aside = self._set_aside, []
        refused = self._write_each(entries)
        with self._lock:
            self._set_aside.extend(refused)

    def _write_each(self, entries: list[_Entry]) -> list[_Entry]:
        """Commit each row in a transaction of its own; the entries whose row the database refused."""
        refused = []
        for entry in entries:
            try:
                added = self.store.add_instances([entry[0]])
            except StoreUnavailableError:
                refused.append(entry)
                continue
            self._settle([entry], added)
        return refused

    def _drop_unheld(self, row: Mapping[str, Any]) -> None:
        """The SOP Instance UID was recorded meanwhile (by an association on pynetdicom's path, whose
        rows go in at once): that row is kept, and a file placed elsewhere for this one goes."""
        try:
            kept = self.store.get_instance(row["sop_instance_uid"])
        except StoreUnavailableError:
            return  # a stray file is harmless; deleting the kept one is not
        if kept is not None and kept.path != row["path"]:
            with contextlib.suppress(OSError):
                os.unlink(row["path"])
        log.info("duplicate instance %s: the first is kept", uid_hash(row["sop_instance_uid"]))


def _holds(path: Path, data: bytes) -> bool:
    """True when the file at ``path`` holds ``data`` (size, then CRC-32 of its content)."""
    try:
        if path.stat().st_size != len(data):
            return False
        return zlib.crc32(path.read_bytes()) == zlib.crc32(data)
    except OSError:
        return False


def _write(path: Path, data: bytes) -> None:
    try:
        fh = open_private(path)
    except FileNotFoundError:
        private_folder(path.parent)  # the study's first instance
        fh = open_private(path)
    with fh:
        fh.write(data)


def _write_durably(path: Path, data: bytes) -> None:
    private_folder(path.parent)
    with open_private(path) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _rename_durably(tmp: Path, final: Path) -> None:
    """Atomic rename, then fsync the folder so the rename itself survives a power cut."""
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
