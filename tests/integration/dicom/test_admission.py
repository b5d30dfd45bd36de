"""Admission under hostile traffic, over real sockets: idle connections, random bytes and malformed
PDUs on the DICOM port while a good pynetdicom sender stores instances and echoes."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from integration.db.store import Store
from integration.dicom.network import admission
from integration.dicom.network.listener import DicomListener
from tests.integration.dicom.peers import echo_answer, is_rejected_transient

CT_SMALL = get_testdata_file("CT_small.dcm")
MARKER = b"SECRET-PATIENT-MARKER-7731"


class _Capture(logging.Handler):
    """Every record that reaches the root logger, formatted as a production handler would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    levels = {name: logging.getLogger(name).level for name in ("pynetdicom", "pydicom")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)  # what an operator chasing a problem might set
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def guarded(store: Store, tmp_path: Path) -> Iterator[DicomListener]:
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, associate_timeout=1.5, max_associations=32)
    lst.start()
    yield lst
    lst.stop()


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    out = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        out.append(sock)
    return out


def _hostile_traffic(port: int, stop: threading.Event) -> None:
    """Until ``stop``: connections that close without a byte, random bytes, malformed PDUs carrying MARKER."""
    rng = random.Random(7)
    while not stop.is_set():
        kind = rng.randrange(4)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if kind == 0:
                    pass  # a TCP check: open and close
                elif kind == 1:
                    sock.sendall(os.urandom(rng.randrange(1, 200)))
                elif kind == 2:  # an A-ASSOCIATE-RQ whose body is garbage with the marker in it
                    body = b"\x00\x01\x00\x00" + MARKER * 4
                    sock.sendall(b"\x01\x00" + len(body).to_bytes(4, "big") + body)
                else:  # a P-DATA-TF where the request was due
                    body = (len(MARKER) + 2).to_bytes(4, "big") + b"\x01\x03" + MARKER
                    sock.sendall(b"\x04\x00" + len(body).to_bytes(4, "big") + body)
                sock.settimeout(0.5)
                try:
                    sock.recv(64)
                except OSError:
                    pass
        except OSError:
            pass
        time.sleep(0.005)


def _instance(study: str) -> Dataset:
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_idle_connections_and_random_bytes_do_not_lock_out_a_good_sender(
    guarded: DicomListener, store: Store, captured: _Capture
) -> None:
    port = guarded.port
    idle = _idle_connections(port, 50)  # more than MEDBRIDGE_MAX_ASSOCIATIONS, all from the sender's address
    stop = threading.Event()
    noise = [threading.Thread(target=_hostile_traffic, args=(port, stop), daemon=True) for _ in range(2)]
    for thread in noise:
        thread.start()
    sent, echoes = [], []
    try:
        ae = AE(ae_title="GOOD_SCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        ae.add_requested_context(Verification)
        study = generate_uid()
        deadline = time.monotonic() + 8  # past the associate timeout: the idle ones are closed meanwhile
        while time.monotonic() < deadline or len(sent) < 30:
            assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
            assert assoc.is_established, "a good sender is admitted beside the hostile traffic"
            try:
                for _ in range(5):
                    ds = _instance(study)
                    status = assoc.send_c_store(ds)
                    assert status.Status == 0x0000
                    sent.append(ds.SOPInstanceUID)
                echo = assoc.send_c_echo()
                echoes.append(echo.Status)
            finally:
                assoc.release()
            if len(sent) >= 200:
                break
    finally:
        stop.set()
        for thread in noise:
            thread.join(5)
        for sock in idle:
            sock.close()
    assert echoes and all(status == 0x0000 for status in echoes)
    missing = [uid for uid in sent if store.get_instance(uid) is None]
    assert not missing, f"{len(missing)} of {len(sent)} acknowledged instances are not stored"

    # the idle ones were closed (timeout, or to make room), the garbage refused; all counted
    rejections = guarded.gate.rejections()
    assert rejections.get(admission.MALFORMED, 0) > 0
    assert rejections.get(admission.NO_REQUEST, 0) + rejections.get(admission.PENDING_EVICTED, 0) >= 50
    assert rejections.get(admission.ASSOCIATION_LIMIT, 0) == 0
    # one summary line per reason and interval, without bytes from the peers
    text = "\n".join(captured.lines)
    assert "DICOM connection refused" in text
    _assert_no_peer_bytes(text)


def test_an_idle_connection_is_closed_after_the_associate_timeout(guarded: DicomListener) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.settimeout(10)
        began = time.monotonic()
        assert sock.recv(16) == b"", "closed by the listener"
        assert 1.0 <= time.monotonic() - began < 5
    assert guarded.gate.rejections().get(admission.NO_REQUEST) == 1


def test_associations_past_the_per_address_cap_are_rejected_transient_and_health_says_saturated(
    store: Store, tmp_path: Path
) -> None:
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, max_connections_per_address=2)
    lst.start()
    try:
        ae = AE(ae_title="GREEDY")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", lst.port, ae_title="MEDBRIDGE") for _ in range(2)]
        assert all(a.is_established for a in held)
        assert not lst.saturated()
        answer = echo_answer(lst.port, calling_ae="GREEDY")
        assert is_rejected_transient(answer), answer
        assert lst.gate.rejections() == {admission.ADDRESS_LIMIT: 1}
        assert lst.saturated() and lst.gate.status()["saturated"] is True
        for assoc in held:
            assoc.release()
        time.sleep(0.2)
        again = ae.associate("127.0.0.1", lst.port, ae_title="MEDBRIDGE")
        assert again.is_established, "the slots come back once the associations end"
        again.release()
    finally:
        lst.stop()


def test_malformed_pdus_on_an_association_leave_no_bytes_and_no_traceback_in_the_log(
    listener: DicomListener, captured: _Capture
) -> None:
    # a query association is pynetdicom's: its decoder meets the malformed PDU
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    assert raw is not None
    # a P-DATA-TF whose PDV claims more than the PDU holds, with the marker inside
    body = (0x7FFF).to_bytes(4, "big") + b"\x01\x03" + MARKER * 3
    raw.sendall(b"\x04\x00" + len(body).to_bytes(4, "big") + body)
    deadline = time.monotonic() + 10
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    # and a storage association (MedBridge's own path): a PDU type that has no place in data transfer
    store_ae = AE(ae_title="STORER")
    store_ae.add_requested_context(CTImageStorage)
    second = store_ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    assert second.is_established
    second.dul.socket.socket.sendall(b"\x09\x00" + (len(MARKER)).to_bytes(4, "big") + MARKER)
    deadline = time.monotonic() + 10
    while second.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    text = "\n".join(captured.lines)
    _assert_no_peer_bytes(text)
    assert "Traceback" not in text


def _assert_no_peer_bytes(text: str) -> None:
    assert MARKER.decode() not in text
    assert MARKER.hex() not in text.replace(" ", "").lower()
    assert "\\x" not in text, "no escaped bytes"


def test_health_shows_a_saturated_listener_and_metrics_count_refusals(store: Store, tmp_path: Path) -> None:
    from tests import authorized
    from tests.conftest import serve_app, stack_settings

    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, max_associations=1, associate_timeout=1.0)
    lst.start()

    def wire(app: object) -> None:  # as the runtime wires its listener into Services
        services = app.state.services  # type: ignore[attr-defined]
        services.health_details["dicom_listener"] = lst.gate.status
        services.metrics_text.append(lst.metrics_text)

    try:
        with serve_app(stack_settings(tmp_path), store, configure=wire) as port, authorized.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=30
        ) as client:
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["details"]["dicom_listener"]["saturated"] is False
            ae = AE(ae_title="ONE")
            ae.add_requested_context(Verification)
            first = ae.associate("127.0.0.1", lst.port, ae_title="MEDBRIDGE")
            assert first.is_established
            answer = echo_answer(lst.port, calling_ae="ONE")
            assert is_rejected_transient(answer), answer
            with socket.create_connection(("127.0.0.1", lst.port)) as sock:
                sock.sendall(b"\x42" * 10)
                sock.settimeout(5)
                assert sock.recv(16)[:1] == b"\x07", "an A-ABORT answers bytes that are not a request"
            health = client.get("/health")
            # saturated is not down: /health stays 200 (a liveness probe must not restart a busy
            # listener) and says so in its details
            assert health.status_code == 200
            body = health.json()
            assert body["details"]["dicom_listener"]["saturated"] is True
            assert body["details"]["dicom_listener"]["associations"] == 1
            first.release()
            metrics = client.get("/metrics").text
            assert 'medbridge_dicom_rejections_total{reason="association_limit"} 1' in metrics
            assert 'medbridge_dicom_rejections_total{reason="malformed_pdu"} 1' in metrics
            assert 'medbridge_dicom_rejections_total{reason="associate_timeout"} 0' in metrics
    finally:
        lst.stop()

