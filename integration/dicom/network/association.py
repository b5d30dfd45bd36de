"""Storage associations served on a blocking socket, without pynetdicom's polling reactors.

pynetdicom runs three threads per association that hand each message on through queues polled
every millisecond (``time.sleep(0.001)`` in the DUL and association loops), which costs 2-3 ms of
latency per C-STORE request/response and keeps even a do-nothing pynetdicom SCP at ~0.35x of dcmtk's
``storescp`` here. Most associations a PACS or modality opens only store (and echo), so the
listener serves those itself: one thread reads each PDU as it arrives, the instance goes through
the same ``store_instance`` as on the pynetdicom path, and the response is written at once.

The protocol pieces come from pynetdicom (A-ASSOCIATE-RQ decoding, presentation-context
negotiation, A-ASSOCIATE-AC encoding); what is written here is the data transfer of PS3.8
(P-DATA-TF PDVs, A-RELEASE, A-ABORT) and the DIMSE command sets of C-STORE and C-ECHO (PS3.7 9.3.1,
9.3.5), which are small fixed group-0000 structures.

Anything else goes to pynetdicom untouched: the A-ASSOCIATE-RQ is peeked, not read, so
:class:`StorageRequestHandler` can hand the connection to pynetdicom's own handler when a request
proposes query/retrieve, asks for user identity, role selection or extended negotiation, or
arrives over TLS.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry.trace import SpanKind
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.transport import RequestHandler

from integration.dicom.ingest.limits import TOO_LARGE_COMMENT
from integration.dicom.network import admission
from integration.observability import tracing

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
VERIFICATION = "1.2.840.10008.1.1"

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP, C_CANCEL_RQ = 0x0001, 0x8001, 0x0030, 0x8030, 0x0FFF
NO_DATA_SET = 0x0101
STATUS_PROCESSING_FAILURE = 0xC211  # what pynetdicom answers when its handler raises
STATUS_OUT_OF_RESOURCES = 0xA700

# A-ASSOCIATE-RJ (PS3.8 9.3.4): (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_TOO_MANY = (0x02, 0x03, 0x02)  # transient, presentation related, local limit exceeded
# A-ABORT (PS3.8 9.3.8): source 2 = service provider; reasons
ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x02, 0x06

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_MAX_ASSOCIATE_RQ = 1 << 20  # an A-ASSOCIATE-RQ this large is pynetdicom's to refuse
# user information a storage association may carry and still be served here (PS3.7 D.3.3)
_PLAIN_USER_ITEMS = (MaximumLengthNotification, ImplementationClassUIDNotification,
                     ImplementationVersionNameNotification, AsynchronousOperationsWindowNegotiation)


class StoreService(Protocol):
    """What the listener provides to a storage association (``DicomListener`` implements it)."""

    def admission(self, calling_ae: str, called_ae: str, address: str) -> tuple[int, int, int] | None:
        """None to accept (a slot of the association limit is taken: ``admission_ended`` gives it
        back), or the A-ASSOCIATE-RJ (result, source, reason)."""

    def admission_ended(self, address: str) -> None:
        """An association ``admission`` accepted has ended."""

    def store_instance(self, sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str,
                       data_set: bytes, *, association: int, defer_row: bool = False) -> tuple[int, str | None]:
        """The C-STORE status and an optional Error Comment; ``defer_row``: the instance's row may
        be committed after the answer (before ``association_releasing`` returns)."""

    def answered(self, association: int) -> None:
        """A C-STORE's answer is sent: deferred work may run while the peer prepares its next request."""

    def association_releasing(self, association: int) -> None:
        """The peer asked to release: return once what it stored is visible."""

    def association_ended(self, association: int) -> None:
        """Released, aborted or dropped: what it sent can be announced."""


@dataclass(frozen=True)
class StorageAcceptorConfig:
    """How the fast path accepts: contexts it negotiates, PDU size it advertises (0 = no limit),
    the idle timeout, the abstract syntaxes that must go to pynetdicom (query/retrieve) and the
    implementation it names in the A-ASSOCIATE-AC (the association limits are the listener's
    ``admission``, for both paths together)."""

    contexts: list[PresentationContext]
    max_pdu_bytes: int
    network_timeout: float | None
    pynetdicom_only: frozenset[str]
    implementation_class_uid: str
    implementation_version_name: str
    max_instance_bytes: int = 1 << 30  # a data set above it is read and dropped, and answered 0xA700


class AssociationAborted(Exception):
    """The peer aborted, closed the connection, or broke the protocol."""


class ProtocolError(AssociationAborted):
    """The peer broke the protocol: answered with an A-ABORT (service provider) giving ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class StorageAssociations:
    """Serves storage associations and tracks the open ones, so ``close_all()`` can end them."""

    def __init__(self, service: StoreService, config: StorageAcceptorConfig,
                 on_accept: Callable[[], None] | None = None) -> None:
        self.service = service
        self.config = config
        self.on_accept = on_accept  # told of each association accepted (a counter across processes)
        self._open: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self.accepted = 0  # associations this path accepted (the rest were pynetdicom's or refused)

    def active(self) -> int:
        with self._lock:
            return len(self._open)

    def can_serve(self, primitive: A_ASSOCIATE) -> bool:
        """True when every proposed context is one this path serves and nothing else is negotiated."""
        proposed = {str(cx.abstract_syntax) for cx in primitive.presentation_context_definition_list}
        if proposed & self.config.pynetdicom_only:
            return False
        return all(isinstance(item, _PLAIN_USER_ITEMS) for item in primitive.user_information)

    def close_all(self) -> None:
        with self._lock:
            sockets = list(self._open.values())
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def serve(self, sock: socket.socket, address: str, rq_length: int, primitive: A_ASSOCIATE) -> None:
        """Accept or reject the (peeked) request, then serve the association until it ends."""
        _recv_exact(sock, rq_length)  # the A-ASSOCIATE-RQ, already decoded from the peek
        calling, called = str(primitive.calling_ae_title).strip(), str(primitive.called_ae_title).strip()
        reject = self.service.admission(calling, called, address)
        if reject is not None:
            sock.sendall(_associate_rj(*reject))
            _await_peer_close(sock)
            return
        association = _Association(self, sock, primitive, calling)
        with self._lock:
            self._open[id(association)] = sock
            self.accepted += 1
        if self.on_accept is not None:
            self.on_accept()
        # the association's span is the root of its studies' traces: the rows it writes carry it on
        with tracing.span("DICOM storage association", kind=SpanKind.SERVER,
                          attributes={"dicom.calling_ae": calling, "dicom.called_ae": called}):
            try:
                association.run()
            finally:
                with self._lock:
                    self._open.pop(id(association), None)
                self.service.admission_ended(address)
                self.service.association_ended(id(association))


class _Association:
    """One accepted association: the A-ASSOCIATE-AC, then data transfer until release or abort."""

    def __init__(self, owner: StorageAssociations, sock: socket.socket, request: A_ASSOCIATE, calling_ae: str) -> None:
        self.owner = owner
        self.sock = sock
        self.request = request
        self.calling_ae = calling_ae
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0

    def run(self) -> None:
        self._accept()
        self.sock.settimeout(self.owner.config.network_timeout)
        command = bytearray()
        data: list[bytes] = []
        data_bytes = 0  # of the data set being received, kept or not
        limit = self.owner.config.max_instance_bytes
        command_done: dict[int, Any] | None = None
        context_id = 0
        try:
            while True:
                pdu_type, body = _read_pdu(self.sock, self.owner.config.max_pdu_bytes)
                if pdu_type == 0x05:  # A-RELEASE-RQ
                    self.owner.service.association_releasing(id(self))
                    self.sock.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                    return
                if pdu_type == 0x07:  # A-ABORT
                    return
                if pdu_type != 0x04:
                    raise ProtocolError(f"PDU type 0x{pdu_type:02X} during data transfer", ABORT_UNEXPECTED_PDU)
                for pdv_context, header, fragment in _pdvs(body):
                    if pdv_context not in self.contexts:
                        raise ProtocolError(f"PDV on presentation context {pdv_context}, which was not accepted")
                    if header & 0x01:  # command fragment
                        command += fragment
                        if header & 0x02:
                            command_done, context_id = _command_set(bytes(command)), pdv_context
                            command.clear()
                            if command_done.get(0x0800) == NO_DATA_SET:
                                self._dispatch(context_id, command_done, b"")
                                command_done = None
                    else:
                        if command_done is None or pdv_context != context_id:
                            raise ProtocolError("a data set fragment with no command before it", ABORT_UNEXPECTED_PDU)
                        data_bytes += len(fragment)
                        if data_bytes <= limit:
                            data.append(fragment)
                        else:
                            data.clear()  # over the limit: the rest is read and dropped, never held
                        if header & 0x02:
                            if data_bytes > limit:
                                self._refuse_too_large(context_id, command_done, data_bytes)
                            else:
                                self._dispatch(context_id, command_done, b"".join(data))
                            command_done = None
                            data.clear()
                            data_bytes = 0
        except ProtocolError as exc:
            log.warning("storage association from %s aborted: %s", self.calling_ae, exc)  # no data set content
            self._abort(exc.reason)
        except TimeoutError:
            self._abort(0x00)  # idle past the network timeout: A-ABORT, as pynetdicom does
            log.info("storage association from %s idle past the network timeout: aborted", self.calling_ae)
        except (AssociationAborted, OSError) as exc:
            log.info("storage association from %s ended without release (%s)", self.calling_ae, type(exc).__name__)

    def _accept(self) -> None:
        """Negotiate the proposed contexts and send the A-ASSOCIATE-AC."""
        config = self.owner.config
        results, _roles = negotiate_as_acceptor(self.request.presentation_context_definition_list, config.contexts)
        self.contexts = {int(cx.context_id): cx for cx in results if cx.result == 0x00}  # type: ignore[arg-type]
        for item in self.request.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
        accept = A_ASSOCIATE()
        accept.application_context_name = APPLICATION_CONTEXT
        accept.calling_ae_title = self.request.calling_ae_title
        accept.called_ae_title = self.request.called_ae_title
        accept.result, accept.result_source = 0x00, 0x01
        accept.presentation_context_definition_results_list = results
        accept.user_information = _acceptor_user_information(config)
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(accept)
        self.sock.sendall(pdu.encode())

    def _dispatch(self, context_id: int, command: dict[int, Any], data_set: bytes) -> None:
        field = command.get(0x0100)
        message_id = int(command.get(0x0110, 0))
        if field == C_STORE_RQ:
            sop_class = str(command.get(0x0002, ""))
            sop_instance = str(command.get(0x1000, ""))
            context = self.contexts[context_id]
            try:
                status, comment = self.owner.service.store_instance(
                    sop_class, sop_instance, str(context.transfer_syntax[0]), self.calling_ae, data_set,
                    association=id(self), defer_row=True,
                )
            except Exception as exc:  # noqa: BLE001 - one failed instance must not end the association
                log.error("C-STORE failed unexpectedly (%s); answered 0xC211", type(exc).__name__)
                status, comment = STATUS_PROCESSING_FAILURE, None
            self._send_command(context_id, _store_response(sop_class, sop_instance, message_id, status, comment))
            self.owner.service.answered(id(self))
        elif field == C_ECHO_RQ:
            self._send_command(context_id, _echo_response(message_id))
        elif field == C_CANCEL_RQ:
            return  # nothing of ours is cancellable: C-STORE answers before the next request is read
        else:
            raise ProtocolError(f"DIMSE command 0x{field or 0:04X} on a storage association", ABORT_UNEXPECTED_PDU)

    def _refuse_too_large(self, context_id: int, command: dict[int, Any], size: int) -> None:
        """A C-STORE whose data set passed MEDBRIDGE_DICOM_MAX_INSTANCE_BYTES: 0xA700, with a comment."""
        if command.get(0x0100) != C_STORE_RQ:
            raise ProtocolError("a data set with a command that takes none", ABORT_UNEXPECTED_PDU)
        log.warning("C-STORE from %s refused: a data set of %d bytes or more, above "
                    "MEDBRIDGE_DICOM_MAX_INSTANCE_BYTES", self.calling_ae, size)
        response = _store_response(str(command.get(0x0002, "")), str(command.get(0x1000, "")),
                                   int(command.get(0x0110, 0)), STATUS_OUT_OF_RESOURCES, TOO_LARGE_COMMENT)
        self._send_command(context_id, response)

    def _send_command(self, context_id: int, command: bytes) -> None:
        """The command set as PDVs within the peer's maximum PDU length."""
        room = self.peer_max_pdu - 6 if self.peer_max_pdu else len(command)
        chunks = [command[i : i + room] for i in range(0, len(command), room)] or [b""]
        out = []
        for i, chunk in enumerate(chunks):
            header = 0x03 if i == len(chunks) - 1 else 0x01
            pdv = _PDV_HEADER.pack(len(chunk) + 2, context_id, header) + chunk
            out.append(_PDU_HEADER.pack(0x04, len(pdv)) + pdv)
        self.sock.sendall(b"".join(out))

    def _abort(self, reason: int) -> None:
        try:
            self.sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, reason)))
        except OSError:
            pass


def _acceptor_user_information(config: StorageAcceptorConfig) -> list[Any]:
    length = MaximumLengthNotification()
    length.maximum_length_received = config.max_pdu_bytes
    klass = ImplementationClassUIDNotification()
    klass.implementation_class_uid = UID(config.implementation_class_uid)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = config.implementation_version_name
    return [length, klass, version]


def _associate_rj(result: int, source: int, reason: int) -> bytes:
    return bytes((0x03, 0, 0, 0, 0, 4, 0, result, source, reason))


def _await_peer_close(sock: socket.socket, artim_seconds: float = 2.0) -> None:
    """After an A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.2, state Sta13): wait
    for that, up to an ARTIM timeout, rather than closing first. A requestor that finds the
    connection gone before it has handled the rejection reports an abort, not a rejection, and a
    transient rejection is what tells it to try again later."""
    try:
        sock.settimeout(artim_seconds)
        while sock.recv(4096):
            pass
    except OSError:
        pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes. Memory grows with what arrives, not with what a PDU header claims."""
    if n > _PREALLOCATE:
        parts, left = [], n
        while left:
            part = _recv_exact(sock, min(left, _PREALLOCATE))
            parts.append(part)
            left -= len(part)
        return b"".join(parts)
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        read = sock.recv_into(view[got:], n - got)
        if read == 0:
            raise AssociationAborted("connection closed by the peer")  # nobody left to tell
        got += read
    return bytes(buf)


_PREALLOCATE = 1 << 20
_MAX_OTHER_PDU = 1 << 16


def _read_pdu(sock: socket.socket, max_length: int) -> tuple[int, bytes]:
    """The next PDU's type and body; a body over ``max_length`` (what we advertised; 0: no limit)
    is a protocol violation (PS3.8 9.3.1)."""
    pdu_type, length = _PDU_HEADER.unpack(_recv_exact(sock, 6))
    if max_length and pdu_type == 0x04 and length > max_length:
        raise ProtocolError(f"P-DATA-TF of {length} bytes, {max_length} advertised")
    if pdu_type != 0x04 and length > _MAX_OTHER_PDU:
        raise ProtocolError(f"PDU type 0x{pdu_type:02X} of {length} bytes")  # A-RELEASE and A-ABORT hold 4
    return pdu_type, _recv_exact(sock, length)


def _pdvs(body: bytes) -> Iterable[tuple[int, int, bytes]]:
    """(context id, message control header, fragment) of each PDV in a P-DATA-TF."""
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            raise ProtocolError("PDV header cut short")
        length, context_id, header = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError("PDV length beyond its PDU")
        yield context_id, header, body[pos + 6 : pos + 4 + length]
        pos += 4 + length


def _command_set(raw: bytes) -> dict[int, Any]:
    """The elements of a group-0000 command set (implicit VR little endian): US values as int,
    UIDs and texts as str, others as bytes."""
    out: dict[int, Any] = {}
    pos, end = 0, len(raw)
    while pos + 8 <= end:
        group, element, length = _ELEMENT_HEADER.unpack_from(raw, pos)
        pos += 8
        value = raw[pos : pos + length]
        if group != 0x0000 or len(value) != length:
            raise ProtocolError("malformed command set")
        pos += length
        if element in _US_ELEMENTS and length == 2:
            out[element] = _US.unpack(value)[0]
        elif element in _TEXT_ELEMENTS:
            out[element] = value.decode("ascii", "replace").rstrip("\x00 ")
        else:
            out[element] = value
    return out


_US_ELEMENTS = frozenset({0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1031})
_TEXT_ELEMENTS = frozenset({0x0002, 0x1000, 0x1030})


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def _command(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, _UL.pack(len(body))) + body


def _store_response(sop_class: str, sop_instance: str, message_id: int, status: int, comment: str | None) -> bytes:
    """C-STORE-RSP command set (PS3.7 9.3.1.2)."""
    elements = [
        _element(0x0002, _even(sop_class.encode("ascii"), b"\x00")),
        _element(0x0100, _US.pack(C_STORE_RSP)),
        _element(0x0120, _US.pack(message_id)),
        _element(0x0800, _US.pack(NO_DATA_SET)),
        _element(0x0900, _US.pack(status)),
    ]
    if comment:
        elements.append(_element(0x0902, _even(comment[:64].encode("ascii", "replace"), b" ")))
    elements.append(_element(0x1000, _even(sop_instance.encode("ascii"), b"\x00")))
    return _command(elements)


def _echo_response(message_id: int) -> bytes:
    """C-ECHO-RSP command set (PS3.7 9.3.5.2)."""
    return _command([
        _element(0x0002, _even(VERIFICATION.encode("ascii"), b"\x00")),
        _element(0x0100, _US.pack(C_ECHO_RSP)),
        _element(0x0120, _US.pack(message_id)),
        _element(0x0800, _US.pack(NO_DATA_SET)),
        _element(0x0900, _US.pack(0x0000)),
    ])


HAND_OVER = "hand_over"  # not ours to judge: pynetdicom reads the request (an A-ASSOCIATE-RQ too large to peek)


def peek_associate_request(sock: socket.socket, timeout: float | None) -> tuple[int, A_ASSOCIATE_RQ] | str:
    """The first PDU, if it is an A-ASSOCIATE-RQ pynetdicom can decode, without consuming it:
    (its length in bytes, the PDU). Otherwise why not: ``admission.NO_REQUEST`` (nothing complete
    within ``timeout``), ``CLOSED_SILENT``, ``MALFORMED`` or :data:`HAND_OVER`."""
    sock.settimeout(timeout)
    try:
        header = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        if not header:
            return admission.CLOSED_SILENT
        if len(header) < 6 or header[0] != 0x01:
            return admission.MALFORMED
        length = 6 + _PDU_HEADER.unpack(header)[1]
        if length > _MAX_ASSOCIATE_RQ:
            return HAND_OVER
        raw = sock.recv(length, socket.MSG_PEEK | socket.MSG_WAITALL)
    except TimeoutError:
        return admission.NO_REQUEST
    except OSError:
        return admission.CLOSED_SILENT
    if len(raw) < length:
        return admission.MALFORMED  # closed mid-request
    try:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(raw)
        pdu.to_primitive()
    except Exception:  # noqa: BLE001 - whatever pynetdicom's decoder raises on peer bytes, they are not a request
        return admission.MALFORMED
    return length, pdu


def storage_request_handler(associations: StorageAssociations, gate: admission.ConnectionGate) -> Any:
    """A pynetdicom request handler class that serves storage associations itself (see module doc),
    and admits connections through ``gate`` first: one that sends no A-ASSOCIATE-RQ in time, or
    bytes that are not one, is closed here, before pynetdicom holds an association for it."""

    class StorageRequestHandler(RequestHandler):
        def handle(self) -> None:
            sock = self.request
            if type(sock) is not socket.socket:
                return super().handle()  # TLS: pynetdicom's own path (peeking needs the plain socket)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            blocking = sock.gettimeout()
            address = str(self.client_address[0])
            gate.arrive(sock, address)
            try:
                peeked = peek_associate_request(sock, gate.limits.associate_timeout)
            finally:
                counted = gate.settle(sock)
            if peeked == HAND_OVER:
                sock.settimeout(blocking)
                return super().handle()
            if not isinstance(peeked, str) and not associations.can_serve(request := peeked[1].to_primitive()):
                sock.settimeout(blocking)
                return super().handle()  # pynetdicom's association thread owns the socket from here
            try:
                if isinstance(peeked, str):
                    self._refuse(sock, peeked, address, counted)
                    return None
                associations.serve(sock, address, peeked[0], request)
            except (AssociationAborted, OSError) as exc:
                log.info("storage association from %s failed (%s)", address, type(exc).__name__)
            finally:
                try:
                    sock.close()
                except OSError:
                    pass
            return None

        @staticmethod
        def _refuse(sock: socket.socket, reason: str, address: str, counted: bool) -> None:
            if counted:  # one the gate closed to make room is counted already
                gate.refused(reason, address)
            if reason == admission.MALFORMED:
                # PS3.8 9.2 (Sta2, AA-1): A-ABORT from the service provider, unexpected PDU
                sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, ABORT_UNEXPECTED_PDU)))

    return StorageRequestHandler
