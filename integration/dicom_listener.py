"""The DICOM edge: a pynetdicom Storage SCP (C-ECHO, C-STORE).

Each instance goes through ``InstanceIngest`` (durable file + store row) before the SCP answers.
Publication happens later, off the association thread: the store's change tracker marks the
study, and the study publisher announces it once it has been quiet (or its association is released).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from integration.dicom_ingest import STATUS_CANNOT_UNDERSTAND, STATUS_SUCCESS, InstanceIngest
from integration.dicom_qr import QueryRetrieveSCP
from integration.errors import StoreUnavailableError
from integration.settings import DicomPeer
from integration.store import Store

log = logging.getLogger(__name__)

# pynetdicom logs request identifiers (patient names among them) at debug level; never let it.
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


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
        dicom_peers: list[DicomPeer] | None = None,
    ) -> None:
        self.store = store
        self.storage_dir = storage_dir
        self.host = host
        self.port = port
        self.ae_title = ae_title
        self.study_quiet_seconds = study_quiet_seconds
        self.ingest = InstanceIngest(store, storage_dir, min_free_bytes=min_free_bytes)
        self.max_associations = max_associations
        self.max_pdu_bytes = max_pdu_bytes
        self.allowed_calling_aets = allowed_calling_aets or []
        self._on_study_ready = on_study_ready  # called (on an association thread) once studies are due
        self._server: Any = None
        self._studies_by_assoc: dict[int, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self.query_retrieve = QueryRetrieveSCP(store, dicom_peers or [], ae_title=ae_title)

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
        self.query_retrieve.add_contexts(ae)
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
            *self.query_retrieve.handlers(),
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
        return self.ingest.has_free_space()

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
        """Store one instance; the status says why not (see ``InstanceIngest.ingest``)."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            part10 = event.encoded_dataset()
        except Exception as exc:  # noqa: BLE001 - any parse failure of peer bytes means "cannot understand"
            log.warning("C-STORE refused: data set cannot be parsed (%s)", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        outcome = self.ingest.ingest(ds, part10, expected_sop_uid=str(event.request.AffectedSOPInstanceUID))
        if outcome.status == STATUS_SUCCESS and outcome.study_instance_uid:
            self._remember(event, outcome.study_instance_uid)
        return outcome.status

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
