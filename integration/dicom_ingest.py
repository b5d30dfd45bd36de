"""Durable ingest of one DICOM instance, shared by every way instances arrive (C-STORE, STOW-RS).

The instance is written durably (temp file, fsync, atomic rename, folder fsync) and recorded in
the store, in one database transaction with the study's change tracker, before the caller answers
success. The answer is a DICOM status (PS3.4 Annex B.2.3), which STOW-RS maps onto HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from integration.dicom_journal import ReceiveJournal
from integration.dicom_scan import InstanceFacts, facts_from_dataset, scan_facts
from integration.errors import StoreUnavailableError
from integration.phi import uid_hash
from integration.store import Store

log = logging.getLogger(__name__)

# C-STORE statuses MedBridge answers with (PS3.4 Annex B.2.3 and pynetdicom's doc_handle_store)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # disk full, read-only folder, store down: the sender should retry later
STATUS_CANNOT_UNDERSTAND = 0xC210  # the data set could not be parsed (truncated, malformed)
STATUS_IDENTIFIER_MISSING = 0xC211  # parsed, but a required UID is missing or disagrees with the command

@dataclass(frozen=True)
class IngestOutcome:
    status: int
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    stored: bool = False  # False for a duplicate (first kept) and for every failure


class InstanceIngest:
    """Checks, writes and records instances under ``storage_dir``; thread-safe."""

    def __init__(
        self, store: Store, storage_dir: Path, *, min_free_bytes: int = 0, journal: ReceiveJournal | None = None
    ) -> None:
        self.store = store
        self.storage_dir = storage_dir
        self.min_free_bytes = min_free_bytes
        # with a journal, an instance is durable once journaled and its file is written without syncs
        self.journal = journal
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
        journaled: bool = True,
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
                                 journaled=journaled)

    def ingest_data_set(
        self, data_set: bytes, transfer_syntax: str, part10: bytes, *, expected_sop_uid: str | None = None
    ) -> IngestOutcome:
        """Store one instance received as data set bytes (what a C-STORE carries) in ``transfer_syntax``.

        The byte scanner reads what ingest needs; only what it declines is parsed by pydicom.
        """
        syntax = UID(transfer_syntax)
        facts = scan_facts(data_set, syntax)
        if facts is not None:
            return self.ingest_facts(facts, part10, transfer_syntax=transfer_syntax, expected_sop_uid=expected_sop_uid)
        try:
            ds = decode(BytesIO(data_set), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        except Exception as exc:  # noqa: BLE001 - any parse failure of peer bytes means "cannot understand"
            log.warning("instance refused: data set cannot be parsed (%s)", type(exc).__name__)
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND)
        return self.ingest(ds, part10, transfer_syntax=transfer_syntax, expected_sop_uid=expected_sop_uid)

    def ingest_facts(
        self, facts: InstanceFacts, part10: bytes, *, transfer_syntax: str, expected_sop_uid: str | None = None,
        journaled: bool = True,
    ) -> IngestOutcome:
        """Check, write and record one instance whose facts are read; ``journaled=False`` writes it
        durably on its own (what replaying a journal does: it must not append to the journal it reads).

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
        if not self.has_free_space():
            # refuse before the disk is full, so the sender keeps the instance and retries later
            log.error("instance %s refused: free space below MEDBRIDGE_MIN_FREE_BYTES", uid_hash(sop_uid))
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, sop_uid, study_uid)
        folder = self.storage_dir / uid_hash(study_uid)
        final = folder / f"{sop_uid}.dcm"
        tmp = folder / f".{sop_uid}.{threading.get_ident()}.tmp"
        values = {
            "sop_instance_uid": sop_uid,
            "study_instance_uid": study_uid,
            "series_instance_uid": facts.series_instance_uid,
            "sop_class_uid": facts.sop_class_uid,
            "transfer_syntax_uid": transfer_syntax,
            "modality": facts.modality,
            "patient_id": facts.patient_id,
            "is_image": facts.is_image,
            "path": str(final),
            "size": len(part10),
            **facts.index,
        }
        journal = self.journal if journaled and self.journal is not None else None
        if journal is not None and len(part10) > journal.largest_record():
            journal = None
        try:
            if journal is not None:
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
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # already renamed, or never written
        if stored:
            log.debug("stored instance %s of study %s", uid_hash(sop_uid), uid_hash(study_uid))
        else:
            log.info("duplicate instance %s: the first is kept", uid_hash(sop_uid))
        return IngestOutcome(STATUS_SUCCESS, sop_uid, study_uid, stored)

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
            finally:
                other.close()
        return restored

    def _replay(self, journal: ReceiveJournal) -> int:
        restored = sum(self._restore(self.storage_dir / relative, part10) for relative, part10 in journal.open())
        journal.checkpoint()
        if restored:
            log.warning("restored %d instance(s) from the receive journal after an unclean stop", restored)
        return restored

    def _restore(self, final: Path, part10: bytes) -> bool:
        row = self.store.get_instance(final.stem)
        if row is None:
            # acknowledged but the row was lost: ingest again, from the journaled bytes
            ds = dcmread(BytesIO(part10))
            return self.ingest(ds, part10, transfer_syntax=str(ds.file_meta.TransferSyntaxUID), journaled=False).stored
        # a duplicate (kept first) has a record too: only bytes of the row's size are the row's
        if row.path == str(final) and row.size == len(part10) and not _holds(final, row.size):
            tmp = final.with_name(f".{final.name}.restore")
            _write(tmp, part10)
            os.replace(tmp, final)
            return True
        return False


def _holds(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
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
