"""Admission of DICOM connections: who may hold a thread and a slot of the association limit.

A TCP connection costs a thread from the moment it is accepted, but only one that has sent its
A-ASSOCIATE-RQ counts against ``MEDBRIDGE_MAX_ASSOCIATIONS``: a port scanner, a load balancer's TCP
check or a peer that connects and says nothing must not lock good senders out. Such a connection
is *pending*: it has ``associate_timeout`` seconds to send its request, after which it is closed.
Pending connections are capped per address and in total; past a cap the oldest pending one is
closed, not the newest (a good sender sends its request within milliseconds of connecting, so it is
never the oldest, while an idle flood from the same address is). Associations are capped per
address too (``REJECT_TOO_MANY`` beyond it), so one caller cannot take every slot.

Every refusal is counted by reason (``/metrics``) and logged without patient data: the reason and
the caller's IP address, one line per reason at most every few seconds with the count since the
last line, so a flood cannot flood the log too.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# reasons a connection or association is refused (the label of medbridge_dicom_rejections_total)
NO_REQUEST = "associate_timeout"  # connected, sent no A-ASSOCIATE-RQ in time
CLOSED_SILENT = "closed_before_request"  # connected and closed without a byte (a TCP check)
MALFORMED = "malformed_pdu"  # the first bytes are not an A-ASSOCIATE-RQ (or not a decodable one)
PENDING_EVICTED = "pending_limit"  # closed to make room: too many silent connections (per address or in all)
ADDRESS_LIMIT = "address_limit"  # the caller holds MEDBRIDGE_DICOM_MAX_CONNECTIONS_PER_ADDRESS associations
ASSOCIATION_LIMIT = "association_limit"  # MEDBRIDGE_MAX_ASSOCIATIONS reached
CALLER_REFUSED = "caller_refused"  # unknown calling AE, wrong called AE, or a remote caller not allowed
LOG_INTERVAL_SECONDS = 5.0
SATURATED_FOR_SECONDS = 10.0  # /health says saturated this long after a limit refused someone


@dataclass(frozen=True)
class AdmissionLimits:
    associate_timeout: float = 5.0
    max_associations: int = 32
    max_per_address: int = 16
    max_pending: int = 128


@dataclass
class _Pending:
    sock: socket.socket
    address: str
    since: float
    evicted: bool = False


@dataclass
class _LogState:
    last: float = 0.0
    unlogged: int = 0
    addresses: set[str] = field(default_factory=set)


class ConnectionGate:
    """Tracks pending connections and admitted associations, both association paths together.
    Thread-safe; every method is quick (no I/O but closing an evicted socket)."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}  # by id(socket), oldest first (dicts keep insertion order)
        self._associations: Counter[str] = Counter()  # admitted associations per address
        self._rejections: Counter[str] = Counter()
        self._log: dict[str, _LogState] = {}
        self._limit_hit_at = float("-inf")

    # pending connections --------------------------------------------------------------------
    def arrive(self, sock: socket.socket, address: str) -> None:
        """A connection accepted: pending until :meth:`settle`. Closes the oldest pending one of
        this address (or of all) when a cap is passed."""
        evict: list[_Pending] = []
        with self._lock:
            self._pending[id(sock)] = _Pending(sock, address, time.monotonic())
            same = [p for p in self._pending.values() if p.address == address and not p.evicted]
            if len(same) > self.limits.max_per_address:
                evict.append(same[0])
            live = [p for p in self._pending.values() if not p.evicted]
            if len(live) > self.limits.max_pending and live[0] not in evict:
                evict.append(live[0])
            for pending in evict:
                pending.evicted = True
        for pending in evict:
            self.refused(PENDING_EVICTED, pending.address)
            try:
                pending.sock.shutdown(socket.SHUT_RDWR)  # its thread's peek returns at once
            except OSError:
                pass

    def settle(self, sock: socket.socket) -> bool:
        """The connection is no longer pending (it sent its request, or is being closed); False
        when the gate closed it to make room (the caller counts nothing more for it)."""
        with self._lock:
            pending = self._pending.pop(id(sock), None)
        return pending is None or not pending.evicted

    def pending(self) -> int:
        with self._lock:
            return sum(1 for p in self._pending.values() if not p.evicted)

    # associations ---------------------------------------------------------------------------
    def admit(self, address: str) -> str | None:
        """Take a slot for an association from ``address``: None when admitted (then :meth:`leave`
        once it ends), else the reason it is refused (answer A-ASSOCIATE-RJ transient)."""
        with self._lock:
            if sum(self._associations.values()) >= self.limits.max_associations:
                reason = ASSOCIATION_LIMIT
            elif self._associations[address] >= self.limits.max_per_address:
                reason = ADDRESS_LIMIT
            else:
                self._associations[address] += 1
                return None
            self._limit_hit_at = time.monotonic()
        return reason

    def leave(self, address: str) -> None:
        with self._lock:
            self._associations[address] -= 1
            if self._associations[address] <= 0:
                del self._associations[address]

    def associations(self) -> int:
        with self._lock:
            return sum(self._associations.values())

    # refusals -------------------------------------------------------------------------------
    def refused(self, reason: str, address: str) -> None:
        """Count a refusal and log it (rate-limited per reason: a line says how many since the last)."""
        now = time.monotonic()
        with self._lock:
            self._rejections[reason] += 1
            state = self._log.setdefault(reason, _LogState())
            state.unlogged += 1
            if len(state.addresses) < 8:
                state.addresses.add(address)
            if now - state.last < LOG_INTERVAL_SECONDS:
                return
            count, addresses = state.unlogged, sorted(state.addresses)
            state.last, state.unlogged, state.addresses = now, 0, set()
        # IP addresses name machines, not patients; nothing the caller sent is logged
        log.warning("DICOM connection refused (%s): %d since the last report, from %s",
                    _REASON_TEXT.get(reason, reason), count, ", ".join(addresses))

    def rejections(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rejections)

    def saturated(self) -> bool:
        """True while every association slot is taken, or a limit refused a caller lately."""
        with self._lock:
            full = sum(self._associations.values()) >= self.limits.max_associations
            return full or time.monotonic() - self._limit_hit_at < SATURATED_FOR_SECONDS

    def status(self) -> dict[str, object]:
        """What /health shows of the listener's admission."""
        return {"saturated": self.saturated(), "associations": self.associations(),
                "max_associations": self.limits.max_associations, "pending_connections": self.pending(),
                "rejections": self.rejections()}


_REASON_TEXT = {
    NO_REQUEST: "no A-ASSOCIATE-RQ within MEDBRIDGE_DICOM_ASSOCIATE_TIMEOUT",
    CLOSED_SILENT: "closed before sending an A-ASSOCIATE-RQ",
    MALFORMED: "malformed PDU where an A-ASSOCIATE-RQ was due",
    PENDING_EVICTED: "too many connections waiting to associate; the oldest was closed",
    ADDRESS_LIMIT: "MEDBRIDGE_DICOM_MAX_CONNECTIONS_PER_ADDRESS reached",
    ASSOCIATION_LIMIT: "MEDBRIDGE_MAX_ASSOCIATIONS reached",
    CALLER_REFUSED: "calling or called AE title not accepted",
}


def metrics_text(rejections: dict[str, int]) -> str:
    """The Prometheus lines of the refusal counters."""
    lines = ["# HELP medbridge_dicom_rejections_total DICOM connections and associations refused, by reason",
             "# TYPE medbridge_dicom_rejections_total counter"]
    for reason in sorted(set(_REASON_TEXT) | set(rejections)):
        lines.append(f'medbridge_dicom_rejections_total{{reason="{reason}"}} {rejections.get(reason, 0)}')
    return "\n".join(lines) + "\n"
