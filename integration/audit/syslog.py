"""Forwarding AuditEvents to an audit record repository as RFC 5424 syslog over TLS (RFC 5425), the
transport IHE ATNA names: ``MEDBRIDGE_AUDIT_SYSLOG=host:port``.

The stored AuditEvent is the record; forwarding is a copy for a central repository, so it never holds a
request up: events go into a bounded queue that one thread drains over one TLS connection (reconnecting
with back-off). When the repository is away long enough to fill the queue, further events are dropped from
the copy (counted and logged), never from the store.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# facility 10 (security/authorization, as ATNA uses), severity 5 (notice)
PRIORITY = 10 * 8 + 5
APP_NAME = "MedBridge"
MSG_ID = "AuditEvent"
_STOP = object()


def frame(event: dict[str, Any], hostname: str, now: datetime | None = None) -> bytes:
    """One RFC 5424 message carrying the AuditEvent's JSON, framed by octet counting (RFC 5425)."""
    stamp = (now or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    message = f"<{PRIORITY}>1 {stamp} {hostname} {APP_NAME} {os.getpid()} {MSG_ID} - \ufeff{body}".encode()
    return f"{len(message)} ".encode() + message


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of MEDBRIDGE_AUDIT_SYSLOG; ValueError saying what to set otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"MEDBRIDGE_AUDIT_SYSLOG must be host:port (e.g. audit.example:6514), not {address!r}")
    return host.strip("[]"), int(port)


class SyslogForwarder:
    """``start()`` / ``stop()``; ``forward(event)`` from any thread, never blocking."""

    def __init__(self, address: str, ca_file: Path | None = None, queue_size: int = 10_000,
                 retry_max_seconds: float = 30.0) -> None:
        self.host, self.port = parse_address(address)
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.retry_max_seconds = retry_max_seconds
        self.hostname = socket.gethostname() or "-"
        self.sent = 0
        self.dropped = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: ssl.SSLSocket | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then close."""
        if self._thread is None:
            return
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._stopping.set()
        self._thread.join(1)
        self._close()

    def forward(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit syslog %s:%d unreachable: %d AuditEvent copies dropped (the store keeps them all)",
                            self.host, self.port, self.dropped)

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=10)
        try:
            return self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _run(self) -> None:
        delay = 0.5
        pending: bytes | None = None
        while not self._stopping.is_set():
            if pending is None:
                item = self.queue.get()
                if item is _STOP:
                    return
                pending = frame(item, self.hostname)
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(pending)
                self.sent += 1
                pending, delay = None, 0.5
            except (OSError, ssl.SSLError) as exc:
                log.warning("audit syslog %s:%d: %s; retrying in %.1f s", self.host, self.port,
                            type(exc).__name__, delay)
                self._close()
                self._stopping.wait(delay)
                delay = min(delay * 2, self.retry_max_seconds)
