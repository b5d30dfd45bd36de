"""The DICOM edge: a pynetdicom Storage SCP (C-ECHO, C-STORE).

Each instance is written durably (temp file, fsync, atomic rename) and recorded in the store
before the SCP answers success. Publication happens later, off the association thread: the
store's change tracker marks the study, and the study publisher announces it once it has been
quiet (or its association is released).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

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

# pynetdicom logs request identifiers (patient names among them) at debug level; never let it.
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


def _first_truncated_element(ds: Any) -> str | None:
    """The tag of a top-level element holding fewer bytes than its declared length, if any.

    pydicom reads a truncated value silently (short bytes); a sender that lost the end of a file
    must get a failure, not a stored half image. Undefined-length values fail in pydicom itself.
    """
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and length not in (None, 0xFFFFFFFF) and len(value) < length:
            return str(tag)
    return _short_native_pixel_data(ds)


def _short_native_pixel_data(ds: Any) -> str | None:
    """'PixelData' when uncompressed pixel data holds fewer bytes than its image attributes need."""
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    raw = ds.get_item(0x7FE00010)
    value = getattr(raw, "value", None)
    if not isinstance(value, bytes):
        return None
    try:
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        pixels *= int(ds.get("NumberOfFrames", 1) or 1)
        needed = (pixels * int(ds.BitsAllocated) + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return "PixelData"  # pixels without the attributes that describe them cannot be understood
    return "PixelData" if len(value) < needed else None


class DicomListener:
    """Storage SCP. ``start()`` binds the port (non-blocking server), ``stop()`` shuts it down."""

    def __init__(
        self,
        store: Store,
        storage_dir: Path,
        *,
        host: str,
        port: int,
        ae_title: str,
        study_quiet_seconds: float,
        min_free_bytes: int = 0,
        max_associations: int = 32,
        max_pdu_bytes: int = 0,
        allowed_calling_aets: list[str] | None = None,
        on_study_ready: Any = None,
    ) -> None:
        self.store = store
        self.storage_dir = storage_dir
        self.host = host
        self.port = port
        self.ae_title = ae_title
        self.study_quiet_seconds = study_quiet_seconds
        self.min_free_bytes = min_free_bytes
        self.max_associations = max_associations
        self.max_pdu_bytes = max_pdu_bytes
        self.allowed_calling_aets = allowed_calling_aets or []
        self._on_study_ready = on_study_ready  # called (on an association thread) once studies are due
        self._free_checked_at = 0.0
        self._free_ok = True
        self._server: Any = None
        self._studies_by_assoc: dict[int, set[str]] = defaultdict(set)
        self._lock = threading.Lock()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu_bytes  # 0: no limit, so fewer PDUs per instance
        # With an allow-list, unknown callers, or callers that name another AE, get A-ASSOCIATE-RJ.
        # Without one (the embedded default) any caller is accepted, as Orthanc does out of the box.
        ae.require_called_aet = bool(self.allowed_calling_aets)
        ae.require_calling_aet = self.allowed_calling_aets
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        ae = self._build_ae()
        handlers = [
            (evt.EVT_CONN_OPEN, self._handle_conn_open),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_RELEASED, self._handle_assoc_end),
            (evt.EVT_ABORTED, self._handle_assoc_end),
        ]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        # port 0 means "any free port" (tests): report the real one
        self.port = self._server.server_address[1]
        log.info("DICOM listener %s on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def running(self) -> bool:
        return self._server is not None

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

    # handlers run on association threads ----------------------------------------------------
    @staticmethod
    def _handle_conn_open(event: evt.Event) -> None:
        # Nagle's algorithm costs ~50x on loopback per small PDU exchange; DICOM is request/response
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def _handle_echo(event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _handle_store(self, event: evt.Event) -> int:
        """Store one instance.

        Returns 0x0000 when the instance is durably stored (or was already held: keep first),
        0xC210 when the data set cannot be parsed, 0xC211 when its UIDs are missing or disagree
        with the C-STORE request, 0xA700 when the disk or the database cannot take it, or free
        space is below the configured floor.
        """
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid = str(ds.SOPInstanceUID)
            study_uid = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
            sop_class = str(ds.SOPClassUID)
            modality = str(ds.get("Modality", "") or "") or None
            patient_id = str(ds.get("PatientID", "") or "") or None
            is_image = "PixelData" in ds and (modality or "") not in _NON_IMAGE_MODALITIES
            truncated = _first_truncated_element(ds)
        except AttributeError:
            log.warning("C-STORE refused: required UID missing")
            return STATUS_IDENTIFIER_MISSING
        except Exception as exc:  # noqa: BLE001 - any parse failure of peer bytes means "cannot understand"
            log.warning("C-STORE refused: data set cannot be parsed (%s)", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        if truncated is not None:
            log.warning("C-STORE of %s refused: element %s is truncated", uid_hash(sop_uid), truncated)
            return STATUS_CANNOT_UNDERSTAND
        if sop_uid != str(event.request.AffectedSOPInstanceUID):
            return STATUS_IDENTIFIER_MISSING
        if not self.has_free_space():
            # refuse before the disk is full, so the sender keeps the instance and retries later
            log.error("C-STORE of %s refused: free space below MEDBRIDGE_MIN_FREE_BYTES", uid_hash(sop_uid))
            return STATUS_OUT_OF_RESOURCES
        folder = self.storage_dir / uid_hash(study_uid)
        final = folder / f"{sop_uid}.dcm"
        tmp = folder / f".{sop_uid}.{threading.get_ident()}.tmp"
        try:
            encoded = event.encoded_dataset()
            _write_durably(tmp, encoded)
            stored = self.store.add_instance(
                DicomInstance(
                    sop_instance_uid=sop_uid,
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    sop_class_uid=sop_class,
                    transfer_syntax_uid=str(event.file_meta.TransferSyntaxUID),
                    modality=modality,
                    patient_id=patient_id,
                    is_image=is_image,
                    path=str(final),
                    size=len(encoded),
                ),
                place_file=lambda: _rename_durably(tmp, final),
            )
        except (OSError, StoreUnavailableError) as exc:
            log.error("C-STORE of %s failed: %s", uid_hash(sop_uid), type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # already renamed, or never written
        if not stored:
            log.info("duplicate instance %s: the first is kept", uid_hash(sop_uid))
        self._remember(event, study_uid)
        log.info("stored instance %s of study %s", uid_hash(sop_uid), uid_hash(study_uid))
        return STATUS_SUCCESS

    def _remember(self, event: evt.Event, study_uid: str) -> None:
        with self._lock:
            self._studies_by_assoc[id(event.assoc)].add(study_uid)

    def _handle_assoc_end(self, event: evt.Event) -> None:
        with self._lock:
            studies = self._studies_by_assoc.pop(id(event.assoc), set())
        if studies:
            try:
                self.store.expedite("study", sorted(studies), self.study_quiet_seconds)
            except StoreUnavailableError:
                log.warning("could not expedite studies; they will publish after the quiet period")
                return
            if self._on_study_ready:
                self._on_study_ready()


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
