"""AuditEvents forwarded as RFC 5424 syslog over TLS (RFC 5425 framing), as IHE ATNA sends them, to a real
TLS server; and a repository that is away loses no request and drops copies only past the queue."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from integration.audit.syslog import PRIORITY, SyslogForwarder, parse_address
from integration.db.store import Store
from tests import authorized
from tests.conftest import serve_app, stack_settings
from tests.integration.dicom.test_tls import pki  # noqa: F401 - the CA and localhost certificate fixture


class SyslogServer:
    """A TLS syslog receiver on 127.0.0.1 that collects the octet-counted messages it is sent."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with self.context.wrap_socket(conn, server_side=True) as tls:
            buffer = b""
            while chunk := tls.recv(65536):
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self.messages.append(rest[: int(length)])
                    buffer = rest[int(length):]

    def wait_for(self, count: int, timeout: float = 20) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} syslog messages arrived"
            time.sleep(0.05)
        return self.messages


def test_each_audit_event_reaches_the_syslog_server_as_rfc5424_over_tls(
    store: Store, tmp_path: Path, pki: dict[str, Path]  # noqa: F811
) -> None:
    server = SyslogServer(pki["server_cert"], pki["server_key"])
    forwarder = SyslogForwarder(f"localhost:{server.port}", pki["ca"])
    forwarder.start()
    try:
        def wire(app) -> None:  # noqa: ANN001 - FastAPI
            app.state.services.audit_forward = forwarder.forward

        with serve_app(stack_settings(tmp_path), store, configure=wire) as port:
            base = f"http://127.0.0.1:{port}/fhir"
            pid = authorized.post(f"{base}/Patient", json={"resourceType": "Patient"}, timeout=30,
                             headers={"Content-Type": "application/fhir+json"}).json()["id"]
            assert authorized.get(f"{base}/Patient/{pid}", timeout=30).status_code == 200
            messages = server.wait_for(2)
    finally:
        forwarder.stop()
    header, _, body = messages[0].partition(b" - \xef\xbb\xbf")
    assert header.startswith(f"<{PRIORITY}>1 ".encode()) and b" MedBridge " in header and b" AuditEvent" in header
    events = [json.loads(m.partition(b" - \xef\xbb\xbf")[2]) for m in messages]
    assert [e["subtype"][0]["code"] for e in events] == ["create", "read"]
    assert events[0]["entity"][0]["what"]["reference"] == f"Patient/{pid}/_history/1"
    assert json.loads(body)["id"] == events[0]["id"]  # the stored AuditEvent, not another one


def test_an_unreachable_repository_drops_copies_past_the_queue_and_blocks_nothing() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    forwarder = SyslogForwarder(f"127.0.0.1:{port}", queue_size=3, retry_max_seconds=0.2)
    forwarder.start()
    started = time.monotonic()
    for i in range(10):
        forwarder.forward({"resourceType": "AuditEvent", "id": str(i)})
    assert time.monotonic() - started < 0.5
    assert forwarder.dropped >= 6 and forwarder.sent == 0
    forwarder.stop(timeout=0.5)


def test_a_malformed_address_says_what_to_set() -> None:
    with pytest.raises(ValueError, match="MEDBRIDGE_AUDIT_SYSLOG must be host:port"):
        parse_address("audit.example")
    assert parse_address("[::1]:6514") == ("::1", 6514)
