"""DICOM TLS on a second port: real TLS handshakes (pynetdicom and dcmtk), mutual authentication."""

from __future__ import annotations

import datetime
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE

from integration.db.store import Store
from integration.dicom.network.listener import DicomListener, tls_context

CT_SMALL = get_testdata_file("CT_small.dcm")


def _issue(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
           *, ca: bool = False, san: str | None = None) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = issuer if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, as PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("MedBridge test CA", ca_key, None, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _issue("localhost", server_key, (ca.subject, ca_key), san="localhost")
    client = _issue("MODALITY1", client_key, (ca.subject, ca_key))
    ca_path, _ = _write(tmp_path, "ca", ca, ca_key)
    server_cert, server_key_path = _write(tmp_path, "server", server, server_key)
    client_cert, client_key_path = _write(tmp_path, "client", client, client_key)
    return {"ca": ca_path, "server_cert": server_cert, "server_key": server_key_path,
            "client_cert": client_cert, "client_key": client_key_path}


@pytest.fixture
def tls_listener(store: Store, tmp_path: Path, pki: dict[str, Path]) -> Iterator[DicomListener]:
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60,
                        tls=tls_context(pki["server_cert"], pki["server_key"], client_ca=pki["ca"]), tls_port=0)
    lst.start()
    yield lst
    lst.stop()


def _client_context(pki: dict[str, Path], *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki["ca"])
    if with_certificate:
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
    return context


def test_store_over_mutual_tls_is_stored(tls_listener: DicomListener, store: Store, pki: dict[str, Path]) -> None:
    ds = dcmread(CT_SMALL)
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", tls_listener.tls_port, ae_title="MEDBRIDGE",
                         tls_args=(_client_context(pki, with_certificate=True), "localhost"))
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert store.get_instance(ds.SOPInstanceUID) is not None


def test_tls_port_refuses_callers_without_a_client_certificate_or_without_tls(
    tls_listener: DicomListener, pki: dict[str, Path]
) -> None:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context("1.2.840.10008.1.1")
    anonymous = ae.associate("127.0.0.1", tls_listener.tls_port, ae_title="MEDBRIDGE",
                             tls_args=(_client_context(pki, with_certificate=False), "localhost"))
    assert not anonymous.is_established
    plain = ae.associate("127.0.0.1", tls_listener.tls_port, ae_title="MEDBRIDGE")
    assert not plain.is_established
    # the plain port is unaffected
    assoc = ae.associate("127.0.0.1", tls_listener.port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    assoc.release()


def test_dcmtk_echoscu_over_tls(tls_listener: DicomListener, pki: dict[str, Path]) -> None:
    base = ["echoscu", "-aet", "MODALITY1", "-aec", "MEDBRIDGE"]
    ok = subprocess.run([*base, "+tls", str(pki["client_key"]), str(pki["client_cert"]), "+cf", str(pki["ca"]),
                         "127.0.0.1", str(tls_listener.tls_port)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    untrusted = subprocess.run([*base, "+tls", str(pki["client_key"]), str(pki["client_cert"]),
                                "127.0.0.1", str(tls_listener.tls_port)], capture_output=True, text=True, timeout=30)
    assert untrusted.returncode != 0  # dcmtk verifies the server against its trusted CAs (none given)


def test_bad_certificate_paths_say_which_settings_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MEDBRIDGE_DICOM_TLS_CERT"):
        tls_context(tmp_path / "missing.crt", tmp_path / "missing.key")
