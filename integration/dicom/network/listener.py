"""The DICOM edge: a pynetdicom Storage SCP (C-ECHO, C-STORE).

Each instance goes through ``InstanceIngest`` (durable file + store row) before the SCP answers.
Publication happens later, off the association thread: the store's change tracker marks the
study, and the study publisher announces it once it has been quiet (or its association is released).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry.trace import SpanKind
from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, PYNETDICOM_IMPLEMENTATION_UID, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from integration.app.settings import DicomPeer, Settings
from integration.datadir import private_folder
from integration.db.store import Store
from integration.dicom.ingest.instances import (
    DEFAULT_MAX_INSTANCE_BYTES,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceIngest,
)
from integration.dicom.ingest.journal import ReceiveJournal
from integration.dicom.network.admission import CALLER_REFUSED, AdmissionLimits, ConnectionGate
from integration.dicom.network.admission import metrics_text as admission_metrics_text
from integration.dicom.network.association import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_TOO_MANY,
    StorageAcceptorConfig,
    StorageAssociations,
    storage_request_handler,
)
from integration.dicom.network.logs import install_log_hygiene
from integration.dicom.network.query_retrieve import QueryRetrieveSCP
from integration.errors import StoreUnavailableError
from integration.observability import metrics, tracing

log = logging.getLogger(__name__)

# pynetdicom logs request identifiers (patient names among them) at debug level; never let it.
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


STATUS_DUPLICATE_WARNING = 0xB000
DUPLICATE_COMMENT = "Duplicate SOP Instance UID: the instance already held was kept"
# Error Comments (64 characters at most) for 0xA700: the sender keeps the instance and retries later
INGEST_STOPPED_COMMENT = "Receiver storage failing (see its /health); retry later"
OUT_OF_RESOURCES_COMMENT = "Receiver out of resources (disk or database); retry later"

# Written into the files MedBridge stores, as the implementation that wrote them (PS3.7 D.3.3.2)
MEDBRIDGE_IMPLEMENTATION_UID = PYNETDICOM_IMPLEMENTATION_UID
MEDBRIDGE_IMPLEMENTATION_VERSION = "MEDBRIDGE_010"


_STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


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
        max_pdu_bytes: int = 64 << 10,
        peers: list[DicomPeer] | None = None,
        allow_any_caller: bool | None = None,
        duplicate_status: str = "warning",
        tls: ssl.SSLContext | None = None,
        tls_port: int | None = None,
        on_study_ready: Any = None,
        journal_bytes: int = 16 << 20,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
        process_index: int = 0,
        share_port: bool = False,
        associate_timeout: float = 5.0,
        max_connections_per_address: int = 16,
        max_pending_connections: int = 128,
    ) -> None:
        self.store = store
        self.storage_dir = storage_dir
        self.host = host
        self.port = port
        self.ae_title = ae_title
        self.study_quiet_seconds = study_quiet_seconds
        # the journal lives beside the files it covers: one syncfs at its checkpoint must reach both
        # one journal per listener process (a journal has one writer); process 0 keeps the plain name
        name = "receive" if process_index == 0 else f"receive-{process_index}"
        journal = ReceiveJournal(storage_dir / ".journal", journal_bytes, name=name) if journal_bytes else None
        self.process_index = process_index
        # several listener processes on one port (SO_REUSEPORT): the kernel spreads the associations
        self.share_port = share_port
        self.ingest = InstanceIngest(store, storage_dir, min_free_bytes=min_free_bytes, journal=journal,
                                     max_instance_bytes=max_instance_bytes)
        self.max_associations = max_associations
        # connections before their A-ASSOCIATE-RQ, and the association limits of both paths
        self.gate = ConnectionGate(AdmissionLimits(
            associate_timeout=associate_timeout, max_associations=max_associations,
            max_per_address=max_connections_per_address, max_pending=max_pending_connections))
        self._admitted: dict[int, tuple[Any, str]] = {}  # pynetdicom's associations holding a slot
        self.max_pdu_bytes = max_pdu_bytes
        self.peers = peers or []
        # Unset, and no peers configured (the embedded default): callers on this machine only, as Orthanc's
        # RemoteAccessAllowed=false; a remote caller needs a peer entry (or MEDBRIDGE_DICOM_ALLOW_ANY_CALLER)
        self.allow_any_caller = bool(allow_any_caller)
        self.local_callers_only = allow_any_caller is None and not self.peers
        self.duplicate_status = duplicate_status
        self._peer_addresses: dict[str, set[str]] = {}
        self._on_study_ready = on_study_ready  # called (on an association thread) once studies are due
        self._server: Any = None
        self.tls = tls
        self.tls_port = tls_port
        self._tls_server: Any = None
        self._studies_by_assoc: dict[int, set[str]] = defaultdict(set)
        self._tally: dict[int, Counter[str]] = defaultdict(Counter)
        self._lock = threading.Lock()
        self.query_retrieve = QueryRetrieveSCP(store, self.peers, ae_title=ae_title)
        self.storage_associations: StorageAssociations | None = None
        self.on_storage_association: Callable[[], None] | None = None
        self._recovered = False

    @classmethod
    def from_settings(
        cls, store: Store, s: Settings, *, port: int | None = None, tls: ssl.SSLContext | None = None,
        on_study_ready: Callable[[], None] | None = None, process_index: int = 0,
    ) -> DicomListener:
        """The listener the settings describe; ``process_index`` > 0 for the extra listener
        processes (``MEDBRIDGE_DICOM_PROCESSES``), which share the port and have no TLS port."""
        return cls(
            store, s.dicom_dir, host=s.dicom_host, port=s.dicom_port if port is None else port,
            ae_title=s.dicom_ae_title, study_quiet_seconds=s.study_quiet_seconds, min_free_bytes=s.min_free_bytes,
            max_associations=s.max_associations, max_pdu_bytes=s.max_pdu_bytes, journal_bytes=s.dicom_journal_bytes,
            peers=s.dicom_peers, allow_any_caller=s.dicom_allow_any_caller, duplicate_status=s.dicom_duplicate_status,
            tls=tls, tls_port=s.dicom_tls_port if tls is not None else None, on_study_ready=on_study_ready,
            process_index=process_index, share_port=s.dicom_processes > 1,
            associate_timeout=s.dicom_associate_timeout, max_instance_bytes=s.dicom_max_instance_bytes,
            max_connections_per_address=s.dicom_max_connections_per_address,
            max_pending_connections=s.dicom_max_pending_connections,
        )

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu_bytes  # what one P-DATA-TF may hold (read whole); 0: no limit
        # Callers that name another AE get A-ASSOCIATE-RJ; unknown callers too (see _handle_requested)
        ae.require_called_aet = not (self.allow_any_caller or self.local_callers_only)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.query_retrieve.add_contexts(ae)
        return ae

    def recover(self) -> None:
        """Replay the receive journal (what a crash may have lost since its last checkpoint); once,
        however often called. The runtime calls it before any publisher starts, so a study a crash
        interrupted is announced once, whole, rather than as revisions of what was replayed when;
        ``start()`` calls it too, for callers that do not."""
        if self._recovered:
            return
        private_folder(self.storage_dir)
        self.ingest.recover()
        if self.process_index == 0:
            # journals of listener processes that will not start again (fewer processes than before)
            self.ingest.recover_others()
        self._recovered = True

    def start(self) -> None:
        install_log_hygiene()  # before the first peer can make pynetdicom log what it sent
        self.recover()
        self._peer_addresses = {p.ae_title: _addresses_of(p.host) for p in self.peers}
        ae = self._build_ae()
        self.storage_associations = StorageAssociations(self, StorageAcceptorConfig(
            contexts=ae.supported_contexts,
            max_pdu_bytes=self.max_pdu_bytes,
            network_timeout=ae.network_timeout,
            pynetdicom_only=self.query_retrieve.sop_classes(),
            max_instance_bytes=self.ingest.max_instance_bytes,
            implementation_class_uid=MEDBRIDGE_IMPLEMENTATION_UID,
            implementation_version_name=MEDBRIDGE_IMPLEMENTATION_VERSION,
        ), on_accept=self.on_storage_association)
        handlers = [
            (evt.EVT_CONN_OPEN, self._handle_conn_open),
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_RELEASED, self._handle_assoc_end),
            (evt.EVT_ABORTED, self._handle_assoc_end),
            (evt.EVT_REJECTED, self._handle_assoc_gone),
            (evt.EVT_CONN_CLOSE, self._handle_assoc_gone),
            *self.query_retrieve.handlers(),
        ]
        # Storage-only associations are served by dicom_association on the accepting thread; the
        # others (query/retrieve, user identity, ...) by pynetdicom, behind the same port
        self._server = ae.make_server(
            (self.host, self.port), evt_handlers=handlers,
            server_class=_SharedPortServer if self.share_port else _Server,
            request_handler=storage_request_handler(self.storage_associations, self.gate),
        )
        ae._servers.append(self._server)  # as start_server(block=False) does, so shutdown() finds it
        threading.Thread(target=self._server.serve_forever, name="DicomListener", daemon=True).start()
        # port 0 means "any free port" (tests): report the real one
        self.port = self._server.server_address[1]
        log.info("DICOM listener %s on %s:%d", self.ae_title, self.host, self.port)
        if self.tls is not None and self.tls_port is not None:
            # the same AE, handlers and store behind a second port that speaks DICOM TLS (PS3.15 B.1)
            self._tls_server = ae.start_server(
                (self.host, self.tls_port), block=False, evt_handlers=handlers, ssl_context=self.tls
            )
            self.tls_port = self._tls_server.server_address[1]
            log.info("DICOM TLS listener %s on %s:%d", self.ae_title, self.host, self.tls_port)

    def stop(self) -> None:
        if self._tls_server is not None:
            self._tls_server.shutdown()
            self._tls_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self.storage_associations is not None:
            self.storage_associations.close_all()
        self.ingest.close()
        self._recovered = False  # the journal is closed: a later start opens (and replays) it again

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

    def _handle_requested(self, event: evt.Event) -> None:
        """pynetdicom's path: A-ASSOCIATE-RJ for callers :meth:`admission` refuses."""
        requestor = event.assoc.requestor
        calling = str(requestor.primitive.calling_ae_title).strip()
        self._forget_dead_associations()
        reject = self.admission(calling, str(requestor.primitive.called_ae_title).strip(), requestor.address)
        if reject is not None:
            event.assoc.acse.send_reject(*reject)
            event.assoc.is_rejected = True
            event.assoc.kill()
            return
        with self._lock:
            self._admitted[id(event.assoc)] = (event.assoc, requestor.address)

    def _handle_assoc_gone(self, event: evt.Event) -> None:
        """pynetdicom's path: rejected (after admission, by pynetdicom itself) or disconnected."""
        with self._lock:
            admitted = self._admitted.pop(id(event.assoc), None)
        if admitted is not None:
            self.gate.leave(admitted[1])

    def _forget_dead_associations(self) -> None:
        """Slots of pynetdicom associations whose thread ended without an event we saw."""
        with self._lock:
            dead = [key for key, (assoc, _) in self._admitted.items() if not assoc.is_alive()]
            gone = [self._admitted.pop(key)[1] for key in dead]
        for address in gone:
            self.gate.leave(address)

    def admission(self, calling_ae: str, called_ae: str, address: str) -> tuple[int, int, int] | None:
        """None when the caller may associate (it holds a slot until :meth:`admission_ended`), else
        the A-ASSOCIATE-RJ: permanent, calling AE not recognised; called AE not recognised; or
        transient, local limit exceeded (``MEDBRIDGE_MAX_ASSOCIATIONS``, or
        ``MEDBRIDGE_DICOM_MAX_CONNECTIONS_PER_ADDRESS`` from one address). Both association paths
        ask it. A peer is known by its AE title and the address it calls from, so a stolen AE title
        used from another host is refused too."""
        # a caller's AE title is a label only when it is a configured peer: any caller may send any title
        caller = calling_ae if calling_ae in self._peer_addresses else "other"
        reject = self._caller_check(calling_ae, called_ae, address)
        if reject is not None:
            self.gate.refused(CALLER_REFUSED, address)
            metrics.DICOM_ASSOCIATIONS.labels(caller, CALLER_REFUSED).inc()
            return reject
        reason = self.gate.admit(address)
        if reason is not None:
            self.gate.refused(reason, address)
            metrics.DICOM_ASSOCIATIONS.labels(caller, reason).inc()
            return REJECT_TOO_MANY
        metrics.DICOM_ASSOCIATIONS.labels(caller, "accepted").inc()
        return None

    def admission_ended(self, address: str) -> None:
        self.gate.leave(address)

    def _caller_check(self, calling_ae: str, called_ae: str, address: str) -> tuple[int, int, int] | None:
        if self.allow_any_caller or (self.local_callers_only and _is_loopback(address)):
            return None
        if self.local_callers_only:
            log.warning("association from %s refused: remote DICOM callers need MEDBRIDGE_DICOM_PEERS", address)
            return REJECT_CALLING_AE
        if called_ae != self.ae_title.strip():
            return REJECT_CALLED_AE
        addresses = self._peer_addresses.get(calling_ae)
        if addresses is not None and ("*" in addresses or address in addresses):
            return None
        # AE titles and addresses name machines, not patients
        log.warning("association from unknown caller %s at %s rejected", calling_ae, address)
        return REJECT_CALLING_AE

    def metrics_text(self) -> str:
        """Prometheus lines of this listener's refusals (``medbridge_dicom_rejections_total``) and its
        receive journal's fill (``medbridge_dicom_journal_fill_ratio``)."""
        text = admission_metrics_text(self.gate.rejections())
        journal = self.ingest.journal
        if journal is not None:
            text += ("# HELP medbridge_dicom_journal_fill_ratio How full the receive journal's segment is (0..1)\n"
                     "# TYPE medbridge_dicom_journal_fill_ratio gauge\n"
                     f"medbridge_dicom_journal_fill_ratio {journal.fill():.4f}\n")
        return text

    def saturated(self) -> bool:
        """True while every association slot is taken, or a limit refused a caller in the last seconds."""
        return self.gate.saturated()

    @staticmethod
    def _handle_echo(event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _handle_store(self, event: evt.Event) -> Dataset:
        """pynetdicom's path: store one instance; the status says why not."""
        request: Any = event.request  # a C_STORE on this event
        calling_ae = event.assoc.requestor.ae_title
        with tracing.span("C-STORE", kind=SpanKind.SERVER, attributes={"dicom.calling_ae": calling_ae}):
            status, comment = self.store_instance(
                str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax), calling_ae, request.DataSet.getvalue(),
                association=id(event.assoc),
            )
        response = Dataset()
        response.Status = status
        if comment:
            response.ErrorComment = comment
        return response

    def store_instance(
        self, sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str, data_set: bytes,
        *, association: int, defer_row: bool = False,
    ) -> tuple[int, str | None]:
        """The C-STORE service of both association paths: the status to answer (see
        ``InstanceIngest.ingest_facts``) and an Error Comment for the sender's operator, if any.
        ``association`` identifies the association, for :meth:`association_ended`. ``defer_row``
        (storage-only associations, which cannot query what they sent): the row is committed just
        after the answer, in a batch; :meth:`association_releasing` waits for it."""
        part10 = part10_bytes(sop_class, sop_instance, transfer_syntax, calling_ae, data_set)
        outcome = self.ingest.ingest_data_set(data_set, transfer_syntax, part10, expected_sop_uid=sop_instance,
                                              defer_row=defer_row)
        # a label only for a storage class the standard names: a sender may put anything in the command
        metrics.observe_instance(sop_class if sop_class in _STORAGE_CLASSES else "other", outcome.status,
                                 len(data_set))
        with self._lock:
            tally = self._tally[association]
            tally["stored" if outcome.stored else "duplicate" if outcome.status == STATUS_SUCCESS else "refused"] += 1
            if outcome.status == STATUS_SUCCESS and outcome.study_instance_uid:
                self._studies_by_assoc[association].add(outcome.study_instance_uid)
        if outcome.comment:
            return outcome.status, outcome.comment
        if outcome.status == STATUS_OUT_OF_RESOURCES:
            failure = self.ingest.failure()
            return outcome.status, INGEST_STOPPED_COMMENT if failure else OUT_OF_RESOURCES_COMMENT
        if outcome.status != STATUS_SUCCESS or not outcome.study_instance_uid:
            return outcome.status, None
        if not outcome.stored and self.duplicate_status == "warning":
            # PS3.4 B.2.3 has no warning meant for duplicates; 0xB000 with an Error Comment is what
            # senders log and treat as stored, which is the truth: the instance is held, once
            return STATUS_DUPLICATE_WARNING, DUPLICATE_COMMENT
        return STATUS_SUCCESS, None

    def _handle_assoc_end(self, event: evt.Event) -> None:
        self._handle_assoc_gone(event)
        self.association_ended(id(event.assoc))

    def answered(self, association: int) -> None:
        """A C-STORE's answer is sent: the deferred rows are committed now, while the peer prepares
        its next request."""
        self.ingest.write_rows()

    def association_releasing(self, association: int) -> None:
        """Before the A-RELEASE-RP: what the association stored is queryable, and its studies are
        due rather than after the quiet period, once the sender is told the association is over (a
        PACS may C-FIND right after)."""
        if not self.ingest.flush_rows():
            log.error("received instances are not all in place yet (database or storage folder unavailable); "
                      "the receive journal keeps them")
        with self._lock:
            studies = self._studies_by_assoc.pop(association, set())
            if association in self._tally:
                self._tally[association]["studies"] += len(studies)
        if studies:
            try:
                self.store.expedite("study", sorted(studies), self.study_quiet_seconds)
            except StoreUnavailableError:
                log.warning("could not expedite studies; they will publish after the quiet period")
                return
            if self._on_study_ready:
                self._on_study_ready()

    def association_ended(self, association: int) -> None:
        """Released or aborted: as for a release (an aborted association's rows and studies), then
        one log line for the association."""
        self.association_releasing(association)
        with self._lock:
            tally = self._tally.pop(association, None)
        if tally:
            # one line per association, not per instance: a PACS may push thousands (counts carry no PHI)
            log.info("association ended: %d stored, %d duplicate, %d refused in %d study(ies)",
                     tally["stored"], tally["duplicate"], tally["refused"], tally["studies"])


class _Server(ThreadedAssociationServer):
    # socketserver's default backlog of 5 drops connections of a burst before they are accepted
    request_queue_size = 128


class _SharedPortServer(_Server):
    """A pynetdicom server whose port MedBridge's other listener processes bind too (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # type: ignore[union-attr]
        super().server_bind()


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def _addresses_of(host: str) -> set[str]:
    """The IP addresses a peer's configured host name stands for ('*' for any)."""
    if host == "*":
        return {"*"}
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        log.error("DICOM peer host %r does not resolve; that peer cannot associate until it does", host)
        return set()


def part10_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str, data_set: bytes) -> bytes:
    """The DICOM file (PS3.10) for a data set as received: preamble, 'DICM', File Meta Information.

    The meta group is five short elements; encoding it here instead of through pydicom (what
    ``event.encoded_dataset()`` does) takes a tenth of the time, and this runs once per C-STORE.
    The data set bytes are stored exactly as the peer sent them (deflated ones stay deflated,
    which is what a deflated-syntax file holds after its meta group).
    """
    group = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _uid(sop_class)),
        _meta_element(0x0003, b"UI", _uid(sop_instance)),
        _meta_element(0x0010, b"UI", _uid(transfer_syntax)),
        _IMPLEMENTATION_ELEMENTS,
        _meta_element(0x0016, b"AE", _text(source_ae.strip())),
    ))
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(group)))
    return b"".join((_PREAMBLE, length, group, data_set))


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


_PREAMBLE = b"\x00" * 128 + b"DICM"
_IMPLEMENTATION_ELEMENTS = _meta_element(0x0012, b"UI", _uid(MEDBRIDGE_IMPLEMENTATION_UID)) + _meta_element(
    0x0013, b"SH", _text(MEDBRIDGE_IMPLEMENTATION_VERSION)
)


def tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """Server-side TLS for DICOM: TLS 1.2 or newer (BCP 195); with ``client_ca``, callers must
    present a certificate that CA signed (mutual TLS), as the DICOM Secure Transport profiles ask."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load the DICOM TLS certificate/key ({exc}); check MEDBRIDGE_DICOM_TLS_CERT, "
            "MEDBRIDGE_DICOM_TLS_KEY and MEDBRIDGE_DICOM_TLS_CLIENT_CA"
        ) from exc
    return context
