"""Storage associations served by MedBridge's own data transfer (integration/dicom_association.py).

Real peers over real sockets: dcmtk and pynetdicom as SCUs, and hand-made PDUs for what a
well-behaved SCU never sends (an abort in the middle of an instance, a PDV on a context that was
not accepted). Associations that need more than storage go to pynetdicom behind the same port.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from sqlalchemy import func, select

from integration.db.store import Store
from integration.db.tables import DicomInstance
from integration.dicom.network.listener import DicomListener
from tests.integration.dicom.peers import echo_answer, is_rejected_transient

CT_SMALL = get_testdata_file("CT_small.dcm")
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@contextmanager
def running_listener(store: Store, tmp_path: Path, **options: Any) -> Iterator[DicomListener]:
    """A listener with ``options`` (journal size, limits) on a free port, stopped afterwards."""
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, **options)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop()


def stored_count(store: Store) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(DicomInstance)) or 0)


def test_storescu_and_echoscu_are_served_on_the_storage_path(listener: DicomListener, store: Store) -> None:
    before = listener.storage_associations.accepted  # type: ignore[union-attr]
    for command in (["echoscu"], ["storescu"]):
        args = [*command, "-aec", "MEDBRIDGE", "127.0.0.1", str(listener.port)]
        proc = subprocess.run(args + ([CT_SMALL] if command == ["storescu"] else []),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    assert listener.storage_associations.accepted == before + 2  # type: ignore[union-attr]
    assert store.get_instance(dcmread(CT_SMALL).SOPInstanceUID) is not None


def test_an_association_that_also_queries_is_pynetdicoms_and_both_services_work(
    listener: DicomListener, store: Store
) -> None:
    before = listener.storage_associations.accepted  # type: ignore[union-attr]
    ds = dcmread(CT_SMALL)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ds.StudyInstanceUID
        answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert [int(status.Status) for status, _ in answers] == [0xFF00, 0x0000]
    assert listener.storage_associations.accepted == before  # type: ignore[union-attr]


# ---- hand-made PDUs ------------------------------------------------------------------------------


def associate_raw(port: int, max_pdu: int = 16384) -> socket.socket:
    """An A-ASSOCIATE-RQ for CT Image Storage (context 1, explicit VR LE); returns the socket once accepted."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "RAW_SCU", "MEDBRIDGE"
    context = build_context(CT_SOP_CLASS, [EXPLICIT_LE])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(pdu.encode())
    assert sock.recv(1)[0] == 0x02, "A-ASSOCIATE-AC expected"
    sock.recv(65536)
    return sock


def p_data(context_id: int, header: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment
    return struct.pack(">BxI", 0x04, len(pdv)) + pdv


def store_command(sop_instance: str) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), encoded by pydicom (implicit VR little endian)."""
    command = Dataset()
    command.AffectedSOPClassUID = CT_SOP_CLASS
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    body = encode_implicit(command)
    group = Dataset()
    group.CommandGroupLength = len(body)
    return encode_implicit(group) + body


def encode_implicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        assert chunk, "connection closed"
        header += chunk
    pdu_type, length = struct.unpack(">BxI", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return pdu_type, body


def wait_until_ended(lst: DicomListener, timeout: float = 10) -> None:
    """Return once no storage association is open on ``lst``: each has left its data transfer."""
    deadline = time.monotonic() + timeout
    while lst.storage_associations.active():  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the storage association did not end"
        time.sleep(0.01)


def test_an_abort_in_the_middle_of_an_instance_stores_nothing(listener: DicomListener, store: Store) -> None:
    data = Path(CT_SMALL).read_bytes()
    sop_instance = dcmread(CT_SMALL).SOPInstanceUID
    sock = associate_raw(listener.port)
    sock.sendall(p_data(1, 0x03, store_command(sop_instance)))
    sock.sendall(p_data(1, 0x00, data[1000:20000]))  # a first data set fragment, not the last
    assert listener.storage_associations.active() == 1  # type: ignore[union-attr]  # served on the storage path
    sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-ABORT from the SCU
    sock.close()
    wait_until_ended(listener)  # the association's thread is done with the partial instance
    assert store.get_instance(sop_instance) is None
    assert list(Path(listener.storage_dir).rglob("*.dcm")) == []
    # the listener is still there, and the instance is new to it: success, not the duplicate's 0xB000
    ds = dcmread(CT_SMALL)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert store.get_instance(sop_instance) is not None


def test_a_pdv_on_a_context_that_was_not_accepted_is_aborted(listener: DicomListener, store: Store) -> None:
    sock = associate_raw(listener.port)
    sock.sendall(p_data(3, 0x03, store_command("1.2.3.4")))
    pdu_type, body = read_pdu(sock)
    sock.close()
    assert pdu_type == 0x07 and body[2] == 0x02  # A-ABORT from the service provider
    assert stored_count(store) == 0


def test_an_instance_in_several_pdus_is_stored_byte_for_byte(listener: DicomListener, store: Store) -> None:
    ds = dcmread(CT_SMALL)
    data = Path(CT_SMALL).read_bytes()
    offset = data.index(b"\x08\x00\x05\x00")  # the data set starts after the File Meta Information
    data_set = data[offset:]
    sock = associate_raw(listener.port)
    sock.sendall(p_data(1, 0x03, store_command(ds.SOPInstanceUID)))
    pieces = [data_set[i : i + 5000] for i in range(0, len(data_set), 5000)]
    for i, piece in enumerate(pieces):
        sock.sendall(p_data(1, 0x02 if i == len(pieces) - 1 else 0x00, piece))
    pdu_type, body = read_pdu(sock)
    sock.sendall(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-RELEASE-RQ
    assert read_pdu(sock)[0] == 0x06
    sock.close()
    assert pdu_type == 0x04
    status_at = body.index(b"\x00\x00\x00\x09\x02\x00\x00\x00")  # (0000,0900) US, length 2
    assert struct.unpack("<H", body[status_at + 8 : status_at + 10])[0] == 0x0000
    row = store.get_instance(ds.SOPInstanceUID)
    assert row is not None and Path(row.path).read_bytes().endswith(data_set)


def test_responses_fit_a_peer_that_takes_small_pdus(listener: DicomListener, store: Store) -> None:
    ds = dcmread(CT_SMALL)
    data = Path(CT_SMALL).read_bytes()
    data_set = data[data.index(b"\x08\x00\x05\x00"):]
    sock = associate_raw(listener.port, max_pdu=64)  # the C-STORE-RSP (~150 bytes) needs several PDUs
    sock.sendall(p_data(1, 0x03, store_command(ds.SOPInstanceUID)))
    sock.sendall(p_data(1, 0x02, data_set))
    command = b""
    while True:
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04 and len(body) <= 64  # the limit is on the PDU's variable field (PS3.8 D.1)
        command += body[6:]
        if body[5] & 0x02:  # last fragment of the command
            break
    sock.close()
    status_at = command.index(b"\x00\x00\x00\x09\x02\x00\x00\x00")
    assert struct.unpack("<H", command[status_at + 8 : status_at + 10])[0] == 0x0000
    assert ds.SOPInstanceUID.encode() in command


def test_parallel_associations_through_a_recycling_journal_store_everything_once(
    store: Store, tmp_path: Path
) -> None:
    """Four storescu associations at once over a journal that fills and recycles several times:
    group commit and recycling under concurrency lose nothing and store nothing twice."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = generate_uid()
    shares: list[list[str]] = [[] for _ in range(4)]
    for i in range(40):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        shares[i % 4].append(str(path))
    with running_listener(store, tmp_path, journal_bytes=1 << 20) as lst:  # ~25 instances a segment
        procs = [subprocess.Popen(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(lst.port), *share],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for share in shares]
        for proc in procs:
            assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
        assert lst.storage_associations.accepted == 4  # type: ignore[union-attr]
    with store.session() as s:
        rows = list(s.scalars(select(DicomInstance)))
    assert len(rows) == 40 and len({r.sop_instance_uid for r in rows}) == 40
    for row in rows:
        assert Path(row.path).stat().st_size == row.size


def test_associations_beyond_the_limit_are_rejected_transiently(store: Store, tmp_path: Path) -> None:
    with running_listener(store, tmp_path, max_associations=1) as lst:
        first = associate_raw(lst.port)
        answer = echo_answer(lst.port, calling_ae="SECOND")
        assert is_rejected_transient(answer), answer  # transient: try again later
        first.sendall(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        assert read_pdu(first)[0] == 0x06
        first.close()
        wait_until_ended(lst)
        ae = AE(ae_title="THIRD")
        ae.add_requested_context(CT_SOP_CLASS, EXPLICIT_LE)
        third = ae.associate("127.0.0.1", lst.port, ae_title="MEDBRIDGE")
        assert third.is_established  # the slot is free again once the first is released
        third.release()


def test_a_pdu_longer_than_advertised_is_aborted_without_reading_it(store: Store, tmp_path: Path) -> None:
    with running_listener(store, tmp_path, max_pdu_bytes=16384) as lst:
        sock = associate_raw(lst.port)
        sock.sendall(struct.pack(">BxI", 0x04, 1 << 30) + b"\x00" * 100)  # claims 1 GiB
        pdu_type, body = read_pdu(sock)
        sock.close()
        assert pdu_type == 0x07 and body[2:4] == b"\x02\x06"  # provider abort, invalid PDU parameter value


def test_rows_of_an_open_association_become_queryable_without_its_release(
    listener: DicomListener, store: Store
) -> None:
    """Rows are written in batches after the answers; a batch that does not fill is written by a
    timer, so a PACS querying while its sender keeps the association open sees what was stored."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = generate_uid()
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(CT_SOP_CLASS, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    try:
        sent = []
        for _ in range(3):
            ds.SOPInstanceUID = generate_uid()
            assert assoc.send_c_store(ds).Status == 0x0000
            sent.append(str(ds.SOPInstanceUID))
        deadline = time.monotonic() + 5
        while any(store.get_instance(uid) is None for uid in sent) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(store.get_instance(uid) is not None for uid in sent), "no rows while the association is open"
        assert assoc.is_established
    finally:
        assoc.release()
    assert listener.storage_associations.accepted >= 1  # type: ignore[union-attr]  # served on the storage path
