"""Query/Retrieve SCP over what MedBridge holds: C-FIND, C-GET and C-MOVE (Study and Patient Root).

Registered on the DICOM listener's AE (``add_contexts``, ``handlers``). Matching is
``integration.dicom.query``'s, the same as QIDO-RS. Handlers run on association threads and only
read the store and the stored files. No patient data is logged: only hashed UIDs and AE titles.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from integration.app.settings import DicomPeer
from integration.db.store import Store
from integration.db.tables import DicomInstance
from integration.dicom.network.requestor import adapt_requests
from integration.dicom.query import LEVELS, QueryEngine, QueryError, query_from_identifier, to_dataset
from integration.errors import StoreUnavailableError
from integration.phi import uid_hash

log = logging.getLogger(__name__)

# Query/Retrieve statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700  # the store is down: retry later
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801  # C-MOVE destination not in MEDBRIDGE_DICOM_PEERS (or no port)
STATUS_IDENTIFIER_DOES_NOT_MATCH = 0xA900  # level missing/wrong, or a key MedBridge cannot match on
STATUS_UNABLE_TO_PROCESS = 0xC000  # a matching key's value is malformed (e.g. a date range)
STATUS_SUBOPERATIONS_FAILED = 0xB000  # C-GET/C-MOVE: some instances could not be sent (pynetdicom sets it)

_STUDY_ROOT_LEVELS = ("STUDY", "SERIES", "IMAGE")
_FIND = {StudyRootQueryRetrieveInformationModelFind: _STUDY_ROOT_LEVELS,
         PatientRootQueryRetrieveInformationModelFind: LEVELS}
_RETRIEVE = {StudyRootQueryRetrieveInformationModelGet: _STUDY_ROOT_LEVELS,
             StudyRootQueryRetrieveInformationModelMove: _STUDY_ROOT_LEVELS,
             PatientRootQueryRetrieveInformationModelGet: LEVELS,
             PatientRootQueryRetrieveInformationModelMove: LEVELS}
_MAX_CONTEXTS = 128  # PS3.8: presentation context ids are odd numbers 1-255


def _failure(status: int, message: str, element: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = message[:64]  # LO
    if element:
        from pydicom.datadict import tag_for_keyword

        tag = tag_for_keyword(element)
        if tag is not None:
            ds.OffendingElement = [tag]
    return ds


def _nodelay(event: evt.Event) -> None:
    wrapper = event.assoc.dul.socket
    sock = wrapper.socket if wrapper is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class QueryRetrieveSCP:
    """C-FIND/C-GET/C-MOVE handlers. ``peers`` are the C-MOVE destinations, looked up by AE title."""

    def __init__(self, store: Store, peers: list[DicomPeer], *, ae_title: str) -> None:
        self.engine = QueryEngine(store)
        self.peers = {p.ae_title.strip(): p for p in peers}
        self.ae_title = ae_title
        adapt_requests()  # pynetdicom sends the C-GET and C-MOVE sub-operations with send_c_store

    @staticmethod
    def add_contexts(ae: Any) -> None:
        """Q/R contexts, and SCP/SCU role selection on storage contexts (C-GET sends on the same
        association, so a getscu proposes to be the storage SCP)."""
        for uid in (*_FIND, *_RETRIEVE):
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        # pynetdicom accepts the first of *its* transfer syntaxes that the requestor proposes; explicit
        # VR first means a C-GET to a peer proposing several sends explicit-VR instances as received
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                    *(ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian))]
        for cx in AllStoragePresentationContexts:
            ae.remove_supported_context(cx.abstract_syntax)
            ae.add_supported_context(cx.abstract_syntax, syntaxes, scu_role=True, scp_role=True)

    @staticmethod
    def sop_classes() -> frozenset[str]:
        """The query/retrieve SOP classes this SCP serves (associations proposing them are pynetdicom's)."""
        return frozenset(str(uid) for uid in (*_FIND, *_RETRIEVE))

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_C_FIND, self.handle_find), (evt.EVT_C_GET, self.handle_get),
                (evt.EVT_C_MOVE, self.handle_move)]

    # C-FIND --------------------------------------------------------------------------------
    def handle_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Yield (0xFF00, identifier) per match, then success.

        Failures: 0xA900 when the level is missing or not one of the model's, or a key is one
        MedBridge cannot match on; 0xC000 when a key's value is malformed (the ErrorComment and
        OffendingElement name it); 0xA700 when the store is unavailable. A C-CANCEL stops the
        matches with 0xFE00.
        """
        levels = _FIND.get(event.request.AffectedSOPClassUID, _STUDY_ROOT_LEVELS)
        try:
            query = query_from_identifier(event.identifier, levels=levels)
        except QueryError as exc:
            log.warning("C-FIND refused: identifier element %s", exc.element)
            yield _failure(STATUS_IDENTIFIER_DOES_NOT_MATCH, str(exc), exc.element), None
            return
        try:
            matches = self.engine.find(query)
        except QueryError as exc:
            log.warning("C-FIND refused: matching key %s", exc.element)
            yield _failure(STATUS_UNABLE_TO_PROCESS, str(exc), exc.element), None
            return
        except StoreUnavailableError:
            log.error("C-FIND failed: store unavailable")
            yield _failure(STATUS_OUT_OF_RESOURCES, "MedBridge's store is unavailable; retry later"), None
            return
        log.info("C-FIND %s level from %s: %d matches", query.level, event.assoc.requestor.ae_title, len(matches))
        for match in matches:
            if _cancelled(event):
                yield STATUS_CANCEL, None
                return
            ds = to_dataset(match)
            ds.QueryRetrieveLevel = query.level
            ds.RetrieveAETitle = self.ae_title
            yield STATUS_PENDING, ds

    # C-GET / C-MOVE ------------------------------------------------------------------------
    def _retrieve_rows(self, event: evt.Event) -> tuple[list[DicomInstance], Dataset | None]:
        """The instances a C-GET/C-MOVE identifier names, or a failure status data set."""
        levels = _RETRIEVE.get(event.request.AffectedSOPClassUID, _STUDY_ROOT_LEVELS)
        try:
            query = query_from_identifier(event.identifier, levels=levels)
            unique = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
                      "IMAGE": "SOPInstanceUID"}[query.level]
            if not query.keys.get(unique, "").strip():
                raise QueryError(unique, f"a {query.level}-level retrieve needs this unique key")
        except QueryError as exc:
            log.warning("retrieve refused: identifier element %s", exc.element)
            return [], _failure(STATUS_IDENTIFIER_DOES_NOT_MATCH, str(exc), exc.element)
        try:
            return self.engine.instances(query), None
        except QueryError as exc:
            log.warning("retrieve refused: matching key %s", exc.element)
            return [], _failure(STATUS_UNABLE_TO_PROCESS, str(exc), exc.element)
        except StoreUnavailableError:
            log.error("retrieve failed: store unavailable")
            return [], _failure(STATUS_OUT_OF_RESOURCES, "MedBridge's store is unavailable; retry later")

    def _send(self, event: evt.Event, rows: list[DicomInstance]) -> Iterator[tuple[int, Dataset | None]]:
        """(0xFF00, data set) per instance, read as stored; an unreadable file is a failed sub-operation."""
        for row in rows:
            if _cancelled(event):
                yield STATUS_CANCEL, None
                return
            ds: Dataset
            try:
                ds = dcmread(row.path)
            except (OSError, ValueError) as exc:
                log.error("instance %s cannot be read for retrieve (%s)", uid_hash(row.sop_instance_uid),
                          type(exc).__name__)
                ds = Dataset()  # no file meta: pynetdicom counts the sub-operation as failed
                ds.SOPClassUID = row.sop_class_uid
                ds.SOPInstanceUID = row.sop_instance_uid
            yield STATUS_PENDING, ds

    def handle_get(self, event: evt.Event) -> Iterator[Any]:
        """Yield the number of instances, then each one (C-STORE on this association).

        Failures as ``handle_find``; the final status is 0xB000 when some sub-operations failed
        (for instance no storage context was accepted for a stored transfer syntax).
        """
        rows, failure = self._retrieve_rows(event)
        if failure is not None:
            yield 1
            yield failure, None
            return
        log.info("C-GET from %s: %d instances", event.assoc.requestor.ae_title, len(rows))
        yield len(rows)
        yield from self._send(event, rows)

    def handle_move(self, event: evt.Event) -> Iterator[Any]:
        """Yield the destination from MEDBRIDGE_DICOM_PEERS, the number of instances, then each one.

        0xA801 when the destination AE title is not a configured peer with a port (or refuses the
        association); other failures as ``handle_get``.
        """
        destination = str(event.move_destination or "").strip()
        peer = self.peers.get(destination)
        if peer is None or peer.port is None:
            log.warning("C-MOVE refused: destination %s is not a configured peer with a port", destination)
            yield None, None
            return
        rows, failure = self._retrieve_rows(event)
        contexts = []
        for sop_class in sorted({r.sop_class_uid for r in rows}):
            syntaxes = sorted({r.transfer_syntax_uid for r in rows if r.sop_class_uid == sop_class}
                              | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
            contexts.append(build_context(sop_class, syntaxes))
        if len(contexts) > _MAX_CONTEXTS:
            log.warning("C-MOVE: %d SOP classes, only the first %d are proposed", len(contexts), _MAX_CONTEXTS)
            contexts = contexts[:_MAX_CONTEXTS]
        if not contexts:
            contexts = [build_context("1.2.840.10008.1.1")]  # nothing to send: any valid association
        yield peer.host, peer.port, {"contexts": contexts, "evt_handlers": [(evt.EVT_CONN_OPEN, _nodelay)]}
        if failure is not None:
            yield 1
            yield failure, None
            return
        log.info("C-MOVE from %s to %s: %d instances", event.assoc.requestor.ae_title, destination, len(rows))
        yield len(rows)
        yield from self._send(event, rows)


def _cancelled(event: evt.Event) -> bool:
    """Whether a C-CANCEL for the request has arrived. First hands the GIL over for a moment: the
    C-CANCEL is read by pynetdicom's DUL thread, which otherwise waits up to the 5 ms switch interval
    per turn while this loop answers in pure Python (its answers are queued, not sent), and on a busy
    host the whole answer could be queued before the C-CANCEL was read."""
    time.sleep(0)
    return bool(event.is_cancelled)
