"""Network defaults: loopback binds, the Host allow-list (DNS rebinding), cross-origin writes, FHIR JSON
only, and remote DICOM callers refused until a peer list says who they are."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from integration.app.settings import Settings
from integration.db.store import Store
from integration.dicom.network.listener import DicomListener
from tests import authorized
from tests.integration.auth.conftest import assert_outcome, in_process

PATIENT = {"resourceType": "Patient"}


def test_every_listener_binds_to_loopback_by_default() -> None:
    s = Settings()
    assert (s.http_host, s.dicom_host, s.viewer_host) == ("127.0.0.1", "127.0.0.1", "127.0.0.1")
    assert s.dicom_allow_any_caller is None and not s.metrics_public


def test_a_host_name_not_allowed_is_refused_before_anything_else(sqlite_store: Store, tmp_path: Path) -> None:
    client = in_process(sqlite_store, tmp_path, allowed_hosts="medbridge.hospital.example")
    assert_outcome(client.get("/health", headers={"Host": "evil.example"}), 421)
    assert_outcome(client.get("/fhir/Patient", headers={"Host": "evil.example:8000", **authorized.headers()}), 421)
    assert client.get("/health", headers={"Host": "localhost:8000"}).status_code in (200, 503)
    assert client.get("/health", headers={"Host": "[::1]:8000"}).status_code in (200, 503)
    assert client.get("/health", headers={"Host": "medbridge.hospital.example"}).status_code in (200, 503)


def test_writes_from_another_web_origin_are_refused(sqlite_store: Store, tmp_path: Path) -> None:
    client = in_process(sqlite_store, tmp_path, cors_origins="http://viewer.example:3000")
    headers = {**authorized.headers("integration"), "Content-Type": "application/fhir+json"}
    refused = client.post("/fhir/Patient", json=PATIENT, headers={**headers, "Origin": "http://evil.example"})
    assert "MEDBRIDGE_CORS_ORIGINS" in assert_outcome(refused, 403)["issue"][0]["diagnostics"]
    assert client.post("/fhir/Patient", json=PATIENT, headers={**headers, "Origin": "http://127.0.0.1"}
                       ).status_code == 201  # this server's own origin
    assert client.post("/fhir/Patient", json=PATIENT, headers={**headers, "Origin": "http://viewer.example:3000"}
                       ).status_code == 201
    assert client.get("/fhir/Patient", headers={**headers, "Origin": "http://evil.example"}).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/xml", None])
def test_fhir_writes_take_fhir_json_only(sqlite_store: Store, tmp_path: Path, content_type: str | None) -> None:
    client = in_process(sqlite_store, tmp_path)
    headers = authorized.headers("integration") | ({"Content-Type": content_type} if content_type else {})
    for method, path in (("POST", "/fhir/Patient"), ("PUT", "/fhir/Patient/p1"), ("POST", "/fhir")):
        response = client.request(method, path, content=b'{"resourceType": "Patient"}', headers=headers)
        assert "application/fhir+json" in assert_outcome(response, 415)["issue"][0]["diagnostics"]
    for accepted in ("application/fhir+json; fhirVersion=4.0", "application/json; charset=utf-8"):
        created = client.post("/fhir/Patient", json=PATIENT, headers={**headers, "Content-Type": accepted})
        assert created.status_code == 201


def test_metrics_need_an_admin_unless_made_public(sqlite_store: Store, tmp_path: Path) -> None:
    assert_outcome(in_process(sqlite_store, tmp_path).get("/metrics"), 401)
    public = in_process(sqlite_store, tmp_path, metrics_public=True)
    assert "medbridge_writeback_pending" in public.get("/metrics").text


def _own_non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: the kernel only picks the outgoing address
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.fixture
def open_listener(sqlite_store: Store, tmp_path: Path) -> Iterator[DicomListener]:
    """A listener on every interface with the default caller policy (no peers configured)."""
    lst = DicomListener(sqlite_store, tmp_path / "dicom", host="0.0.0.0", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60)
    lst.start()
    yield lst
    lst.stop()


def _echo(address: str, port: int) -> bool:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate(address, port, ae_title="MEDBRIDGE")
    accepted = bool(assoc.is_established)
    if accepted:
        assoc.release()
    return accepted


def test_without_peers_only_callers_on_this_machine_may_associate(open_listener: DicomListener) -> None:
    address = _own_non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    assert _echo("127.0.0.1", open_listener.port)
    assert not _echo(address, open_listener.port)  # the same machine, but not over loopback: a remote caller
