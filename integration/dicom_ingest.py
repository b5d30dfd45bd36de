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
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from integration.dicom_query import index_fields
from integration.errors import StoreUnavailableError
from integration.phi import uid_hash
from integration.store import DicomInstance, Store

log = logging.getLogger(__name__)

# C-STORE statuses MedBridge answers with (PS3.4 Annex B.2.3 and pynetdicom's doc_handle_store)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # disk full, read-only folder, store down: the sender should retry later
STATUS_CANNOT_UNDERSTAND = 0xC210  # the data set could not be parsed (truncated, malformed)
STATUS_IDENTIFIER_MISSING = 0xC211  # parsed, but a required UID is missing or disagrees with the command

# Composite objects that carry no pixels for the CNN, even if they are "storage" classes
_NON_IMAGE_MODALITIES = {"SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "ECG", "DOC", "REG", "SEG"}

def _first_truncated_element(ds: Any, transfer_syntax: UID) -> str | None:
    """The tag of a top-level element holding fewer bytes than its declared length, if any.

    pydicom reads a truncated value silently (short bytes); a sender that lost the end of a file
    must get a failure, not a stored half image. Only the last element read can be short (the
    parser stops at the end of the bytes), so only it is checked. Undefined-length values fail in
    pydicom itself.
    """
    last = next(reversed(ds.keys()), None) if len(ds) else None
    if last is not None:
        raw = ds.get_item(last)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) < length:
            return str(last)
    return _short_native_pixel_data(ds, transfer_syntax)


def _short_native_pixel_data(ds: Any, transfer_syntax: UID) -> str | None:
    """'PixelData' when uncompressed pixel data holds fewer bytes than its image attributes need."""
    if "PixelData" not in ds or transfer_syntax.is_compressed:
        return None
    raw = ds.get_item(0x7FE00010)
    value = getattr(raw, "value", None)
    if not isinstance(value, bytes):
        return None
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
            samples = 2  # chroma subsampled: two samples per pixel on average (PS3.3 C.7.6.3.1.2)
        pixels = int(ds.Rows) * int(ds.Columns) * samples
        pixels *= int(ds.get("NumberOfFrames", 1) or 1)
        needed = (pixels * int(ds.BitsAllocated) + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return "PixelData"  # pixels without the attributes that describe them cannot be understood
    return "PixelData" if len(value) < needed else None


@dataclass(frozen=True)
class IngestOutcome:
    status: int
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    stored: bool = False  # False for a duplicate (first kept) and for every failure


class InstanceIngest:
    """Checks, writes and records instances under ``storage_dir``; thread-safe."""

    def __init__(self, store: Store, storage_dir: Path, *, min_free_bytes: int = 0) -> None:
        self.store = store
        self.storage_dir = storage_dir
        self.min_free_bytes = min_free_bytes
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
        self, ds: Any, part10: bytes, *, transfer_syntax: str | None = None, expected_sop_uid: str | None = None
    ) -> IngestOutcome:
        """Store one instance: ``ds`` is its parsed data set, ``part10`` the file bytes.

        ``transfer_syntax`` is the one the data set was received in (default: ``ds.file_meta``'s).

        Status 0x0000 when the instance is durably stored (or was already held: keep first),
        0xC210 when the data set cannot be parsed, 0xC211 when its UIDs are missing or disagree
        with ``expected_sop_uid`` (the C-STORE request's), 0xA700 when the disk or the database
        cannot take it, or free space is below the configured floor.
        """
        try:
            sop_uid = str(ds.SOPInstanceUID)
            study_uid = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
            sop_class = str(ds.SOPClassUID)
            modality = str(ds.get("Modality", "") or "") or None
            patient_id = str(ds.get("PatientID", "") or "") or None
            is_image = "PixelData" in ds and (modality or "") not in _NON_IMAGE_MODALITIES
            transfer_syntax = UID(transfer_syntax or ds.file_meta.TransferSyntaxUID)
            truncated = _first_truncated_element(ds, transfer_syntax)
        except AttributeError:
            log.warning("instance refused: required UID missing")
            return IngestOutcome(STATUS_IDENTIFIER_MISSING)
        except Exception as exc:  # noqa: BLE001 - any parse failure of peer bytes means "cannot understand"
            log.warning("instance refused: data set cannot be parsed (%s)", type(exc).__name__)
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND)
        if truncated is not None:
            log.warning("instance %s refused: element %s is truncated", uid_hash(sop_uid), truncated)
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
        try:
            _write_durably(tmp, part10)
            stored = self.store.add_instance(
                DicomInstance(
                    sop_instance_uid=sop_uid,
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    sop_class_uid=sop_class,
                    transfer_syntax_uid=str(transfer_syntax),
                    modality=modality,
                    patient_id=patient_id,
                    is_image=is_image,
                    path=str(final),
                    size=len(part10),
                    **index_fields(ds),
                ),
                place_file=lambda: _rename_durably(tmp, final),
            )
        except (OSError, StoreUnavailableError) as exc:
            log.error("instance %s not stored: %s", uid_hash(sop_uid), type(exc).__name__)
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, sop_uid, study_uid)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # already renamed, or never written
        if stored:
            log.info("stored instance %s of study %s", uid_hash(sop_uid), uid_hash(study_uid))
        else:
            log.info("duplicate instance %s: the first is kept", uid_hash(sop_uid))
        return IngestOutcome(STATUS_SUCCESS, sop_uid, study_uid, stored)


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
