"""Query/Retrieve SCP against dcmtk: findscu, getscu and movescu (to a dcmtk storescp peer)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import text

from integration.app.settings import DicomPeer
from integration.db.store import Store
from integration.dicom.network.listener import DicomListener
from tests.conftest import free_port
from tests.integration.db.before_migrations import as_before_migrations

CT_SMALL = get_testdata_file("CT_small.dcm")  # CompressedSamples^CT1, StudyDate 20040119, CT
MR_SMALL = get_testdata_file("MR_small.dcm")  # CompressedSamples^MR1, StudyDate 20040826, MR
RTPLAN = get_testdata_file("rtplan.dcm")  # Last^First^mid^pre, StudyDate 20030716, RTPLAN
JPEG2K = get_testdata_file("JPEG2000.dcm")  # CompressedSamples^NM1, JPEG 2000 lossless
FILES = (CT_SMALL, MR_SMALL, RTPLAN)
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def peer_port() -> int:
    return free_port()


@pytest.fixture
def listener(store: Store, tmp_path: Path, peer_port: int) -> Iterator[DicomListener]:
    peers = [DicomPeer(ae_title="ARCHIVE", host="127.0.0.1", port=peer_port),
             DicomPeer(ae_title="NOPORT", host="127.0.0.1")]
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, peers=peers, allow_any_caller=True)
    lst.start()
    proc = subprocess.run(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(lst.port), *FILES],
                          capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
    assert proc.returncode == 0, proc.stderr
    yield lst
    lst.stop()


def findscu(listener: DicomListener, out: Path, *keys: str) -> list[Dataset]:
    out.mkdir(exist_ok=True)
    args = ["findscu", "-S", "-X", "-od", str(out), "-aec", "MEDBRIDGE", "127.0.0.1", str(listener.port)]
    for key in keys:
        args += ["-k", key]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
    assert proc.returncode == 0, proc.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def dataset_bytes(path: str | Path) -> bytes:
    """The encoded data set of a Part 10 file, without its preamble and file meta information."""
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        from pydicom.filereader import _read_file_meta_info

        _read_file_meta_info(fh)
        return fh.read()


def assert_same_as_received(listener: DicomListener, retrieved: Path, original: str, *, bit_exact: bool) -> None:
    """The retrieved data set is what MedBridge received: byte for byte where the receiver writes
    what it got (storescp +B), element for element where it re-encodes (getscu writes sequences
    with undefined lengths)."""
    row = listener.store.get_instance(dcmread(original).SOPInstanceUID)
    assert row is not None
    if bit_exact:
        assert dataset_bytes(retrieved) == dataset_bytes(row.path)

    def elements(path: str | Path) -> dict[object, object]:
        return {e.tag: e.value for e in dcmread(path) if e.tag.element != 0 and e.tag != 0xFFFCFFFC}

    assert elements(retrieved) == elements(row.path)
    assert dcmread(retrieved).PixelData == dcmread(original).PixelData


def test_findscu_study_level_wildcard_name_returns_matching_studies(listener: DicomListener, tmp_path: Path) -> None:
    found = findscu(listener, tmp_path / "f", "QueryRetrieveLevel=STUDY", "PatientName=compressed*",
                    "StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
    by_uid = {str(ds.StudyInstanceUID): ds for ds in found}
    ct, mr = dcmread(CT_SMALL), dcmread(MR_SMALL)
    assert set(by_uid) == {ct.StudyInstanceUID, mr.StudyInstanceUID}  # PN matching ignores case; RT plan left out
    assert by_uid[ct.StudyInstanceUID].PatientName == "CompressedSamples^CT1"
    assert by_uid[ct.StudyInstanceUID].StudyDate == "20040119"
    assert by_uid[ct.StudyInstanceUID].ModalitiesInStudy == "CT"
    assert int(by_uid[mr.StudyInstanceUID].NumberOfStudyRelatedInstances) == 1
    assert all(ds.QueryRetrieveLevel == "STUDY" for ds in found)


def test_findscu_wildcard_on_other_attributes_is_case_sensitive(listener: DicomListener, tmp_path: Path) -> None:
    assert findscu(listener, tmp_path / "a", "QueryRetrieveLevel=SERIES", "Modality=c?", "SeriesInstanceUID") == []
    found = findscu(listener, tmp_path / "b", "QueryRetrieveLevel=SERIES", "Modality=C?", "SeriesInstanceUID")
    assert [str(ds.SeriesInstanceUID) for ds in found] == [dcmread(CT_SMALL).SeriesInstanceUID]


@pytest.mark.parametrize(
    ("date_range", "expected"),
    [("20040101-", {CT_SMALL, MR_SMALL}), ("-20040131", {CT_SMALL, RTPLAN}), ("20040201-20041231", {MR_SMALL}),
     ("20040119", {CT_SMALL})],
)
def test_findscu_date_ranges(listener: DicomListener, tmp_path: Path, date_range: str, expected: set[str]) -> None:
    found = findscu(listener, tmp_path / "d", "QueryRetrieveLevel=STUDY", f"StudyDate={date_range}",
                    "StudyInstanceUID")
    assert {str(ds.StudyInstanceUID) for ds in found} == {dcmread(p).StudyInstanceUID for p in expected}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [(("StudyTime=0700-0800",), {CT_SMALL}), (("StudyTime=07",), {CT_SMALL}),
     (("ModalitiesInStudy=MR\\RTPLAN",), {MR_SMALL, RTPLAN}), (("AccessionNumber=*", "StudyID=*"), set(FILES))],
)
def test_findscu_time_ranges_modalities_and_universal_wildcards(
    listener: DicomListener, tmp_path: Path, keys: tuple[str, ...], expected: set[str]
) -> None:
    found = findscu(listener, tmp_path / "t", "QueryRetrieveLevel=STUDY", *keys, "StudyInstanceUID")
    assert {str(ds.StudyInstanceUID) for ds in found} == {dcmread(p).StudyInstanceUID for p in expected}


def test_findscu_image_level_with_uid_list(listener: DicomListener, tmp_path: Path) -> None:
    ct, mr = dcmread(CT_SMALL), dcmread(MR_SMALL)
    found = findscu(listener, tmp_path / "i", "QueryRetrieveLevel=IMAGE",
                    f"SOPInstanceUID={ct.SOPInstanceUID}\\{mr.SOPInstanceUID}", "SOPClassUID", "InstanceNumber",
                    "StudyInstanceUID")
    got = {str(ds.SOPInstanceUID): ds for ds in found}
    assert set(got) == {ct.SOPInstanceUID, mr.SOPInstanceUID}
    assert got[ct.SOPInstanceUID].SOPClassUID == ct.SOPClassUID
    assert got[ct.SOPInstanceUID].StudyInstanceUID == ct.StudyInstanceUID
    assert int(got[ct.SOPInstanceUID].InstanceNumber) == int(ct.InstanceNumber)


def _find_status(port: int, identifier: Dataset) -> list[int]:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    try:
        return [int(st.Status) for st, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()


def test_bad_identifiers_get_failure_statuses_and_the_listener_keeps_serving(
    listener: DicomListener, tmp_path: Path
) -> None:
    no_level = Dataset()
    no_level.StudyInstanceUID = ""
    assert _find_status(listener.port, no_level) == [0xA900]
    bad_date = Dataset()
    bad_date.QueryRetrieveLevel = "STUDY"
    bad_date.StudyDate = "2004-01-19"
    assert _find_status(listener.port, bad_date) == [0xC000]
    # still answering queries
    assert len(findscu(listener, tmp_path / "ok", "QueryRetrieveLevel=STUDY", "StudyInstanceUID")) == 3


def test_getscu_retrieves_the_study_as_received(listener: DicomListener, tmp_path: Path) -> None:
    ct = dcmread(CT_SMALL)
    out = tmp_path / "got"
    out.mkdir()
    proc = subprocess.run(
        ["getscu", "-S", "-aec", "MEDBRIDGE", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={ct.StudyInstanceUID}", "127.0.0.1", str(listener.port)],
        capture_output=True, text=True, timeout=60, env=DCMTK_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    files = list(out.iterdir())
    assert len(files) == 1
    assert_same_as_received(listener, files[0], CT_SMALL, bit_exact=False)


def store_as_received(listener: DicomListener, ds: Dataset) -> None:
    sender = AE(ae_title="MODALITY")
    sender.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = sender.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    row = listener.store.get_instance(str(ds.SOPInstanceUID))
    assert row is not None and row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID  # stored as received


def test_cget_decompresses_for_a_peer_that_accepted_only_uncompressed_data(listener: DicomListener) -> None:
    """An instance stored JPEG 2000 (as received) goes to a C-GET requestor that proposed only
    explicit VR little endian for its SOP class: decompressed, same SOP Instance UID, same pixels."""
    j2k = dcmread(JPEG2K)
    store_as_received(listener, j2k)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(j2k.SOPClassUID, ExplicitVRLittleEndian)
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        received[-1].file_meta = event.file_meta
        return 0x0000

    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE",
                         ext_neg=[build_role(j2k.SOPClassUID, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = j2k.StudyInstanceUID
    try:
        final = [st for st, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)][-1]
    finally:
        assoc.release()
    assert final.Status == 0x0000
    (got,) = received
    assert got.SOPInstanceUID == j2k.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (got.pixel_array == j2k.pixel_array).all()


def test_cget_reports_b000_when_some_instances_cannot_be_sent(listener: DicomListener) -> None:
    ct, mr = dcmread(CT_SMALL), dcmread(MR_SMALL)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.4.50")  # JPEG only: the CT is uncompressed
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True), build_role(MRImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = [ct.StudyInstanceUID, mr.StudyInstanceUID]
    try:
        final = [st for st, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)][-1]
    finally:
        assoc.release()
    assert final.Status == 0xB000
    assert (final.NumberOfFailedSuboperations, final.NumberOfCompletedSuboperations) == (1, 1)
    assert received == [mr.SOPInstanceUID]


@pytest.fixture
def archive(tmp_path: Path, peer_port: int) -> Iterator[Path]:
    """dcmtk storescp as the configured C-MOVE destination ARCHIVE."""
    folder = tmp_path / "archive"
    folder.mkdir()
    proc = subprocess.Popen(["storescp", "+B", "-aet", "ARCHIVE", "-od", str(folder), str(peer_port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while subprocess.run(["echoscu", "-aec", "ARCHIVE", "127.0.0.1", str(peer_port)],
                         capture_output=True, env=DCMTK_ENV).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.2)
    yield folder
    proc.terminate()
    proc.wait(timeout=30)


def movescu(listener: DicomListener, destination: str, *keys: str) -> subprocess.CompletedProcess[str]:
    args = ["movescu", "-S", "-aec", "MEDBRIDGE", "-aem", destination, "127.0.0.1", str(listener.port)]
    for key in keys:
        args += ["-k", key]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=DCMTK_ENV)


def test_movescu_sends_the_series_to_the_configured_peer_byte_for_byte(listener: DicomListener, archive: Path) -> None:
    mr = dcmread(MR_SMALL)
    proc = movescu(listener, "ARCHIVE", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={mr.StudyInstanceUID}",
                   f"SeriesInstanceUID={mr.SeriesInstanceUID}")
    assert proc.returncode == 0, proc.stderr
    received = list(archive.iterdir())
    assert len(received) == 1
    assert_same_as_received(listener, received[0], MR_SMALL, bit_exact=True)


def test_movescu_to_an_unknown_destination_fails_with_a801(listener: DicomListener) -> None:
    ct = dcmread(CT_SMALL)
    for destination in ("STRANGER", "NOPORT"):
        proc = movescu(listener, destination, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ct.StudyInstanceUID}")
        assert proc.returncode != 0
        assert "MoveDestinationUnknown" in proc.stderr  # dcmtk's name for 0xA801


def test_patient_root_find_at_patient_level_counts_studies(listener: DicomListener) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientID = ""
    identifier.PatientName = "Last^*"
    identifier.NumberOfPatientRelatedStudies = ""
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    try:
        answers = [ds for st, ds in assoc.send_c_find(identifier, PatientRootQueryRetrieveInformationModelFind)
                   if st.Status == 0xFF00]
    finally:
        assoc.release()
    plan = dcmread(RTPLAN)
    assert [(a.PatientID, a.PatientName, int(a.NumberOfPatientRelatedStudies)) for a in answers] == [
        (plan.PatientID, plan.PatientName, 1)]


def test_logs_carry_no_patient_data(listener: DicomListener, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # the service's level; pynetdicom's DEBUG dumps show UIDs
    ct = dcmread(CT_SMALL)
    findscu(listener, tmp_path / "p", "QueryRetrieveLevel=STUDY", "PatientName=Compressed*", "PatientID",
            "PatientBirthDate", "StudyDate=20040101-")
    findscu(listener, tmp_path / "q", "QueryRetrieveLevel=STUDY", "StudyDate=not-a-date")
    subprocess.run(["getscu", "-S", "-aec", "MEDBRIDGE", "-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={ct.StudyInstanceUID}", "127.0.0.1", str(listener.port)],
                   capture_output=True, timeout=60, env=DCMTK_ENV, check=True)
    text = caplog.text
    assert "C-FIND" in text  # the handlers did log
    for secret in ("CompressedSamples", "Compressed*", str(ct.PatientID), "20040119", "not-a-date",
                   ct.StudyInstanceUID):
        assert secret not in text


def test_a_database_from_before_the_query_index_opens_and_gains_its_columns(store: Store, tmp_path: Path) -> None:
    with store.engine.begin() as conn:  # what a database from a release before the query index looks like
        as_before_migrations(conn)
        conn.execute(text("ALTER TABLE dicom_instances DROP COLUMN study_description"))
        conn.execute(text("ALTER TABLE dicom_instances DROP COLUMN dicom_json"))
    store.stop()
    reopened = Store(store.url)
    reopened.start()
    try:
        lst = DicomListener(reopened, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                            study_quiet_seconds=60)
        lst.start()
        try:
            subprocess.run(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(lst.port), CT_SMALL],
                           capture_output=True, timeout=60, env=DCMTK_ENV, check=True)
            found = findscu(lst, tmp_path / "m", "QueryRetrieveLevel=STUDY", "StudyDescription", "StudyInstanceUID")
        finally:
            lst.stop()
    finally:
        reopened.stop()
    assert [ds.StudyDescription for ds in found] == [dcmread(CT_SMALL).StudyDescription]


def move_studies_to_archive(listener: DicomListener, study_uids: str | list[str]) -> Dataset:
    """C-MOVE the studies to the ARCHIVE peer; the final response."""
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uids
    try:
        responses = assoc.send_c_move(identifier, "ARCHIVE", StudyRootQueryRetrieveInformationModelMove)
        return [st for st, _ in responses][-1]
    finally:
        assoc.release()


def test_cmove_decompresses_for_a_destination_that_takes_only_uncompressed_data(
    listener: DicomListener, archive: Path
) -> None:
    """dcmtk's storescp (the ARCHIVE peer) accepts uncompressed syntaxes only: the JPEG 2000 instance
    reaches it decompressed, same SOP Instance UID, same pixels."""
    j2k = dcmread(JPEG2K)
    store_as_received(listener, j2k)
    assert move_studies_to_archive(listener, j2k.StudyInstanceUID).Status == 0x0000
    (path,) = list(archive.iterdir())
    got = dcmread(path)
    assert got.SOPInstanceUID == j2k.SOPInstanceUID and not got.file_meta.TransferSyntaxUID.is_compressed
    assert (got.pixel_array == j2k.pixel_array).all()


def test_an_instance_missing_from_disk_is_a_failed_suboperation(listener: DicomListener, archive: Path) -> None:
    ct, mr = dcmread(CT_SMALL), dcmread(MR_SMALL)
    row = listener.store.get_instance(ct.SOPInstanceUID)
    assert row is not None
    Path(row.path).unlink()
    final = move_studies_to_archive(listener, [ct.StudyInstanceUID, mr.StudyInstanceUID])
    assert final.Status == 0xB000
    assert (final.NumberOfFailedSuboperations, final.NumberOfCompletedSuboperations) == (1, 1)
    assert len(list(archive.iterdir())) == 1


MATCHES = 300  # under load (3 busy loops on 2 cores) the cancel took effect after 8-14
# C-CANCEL-RQ's command set as pynetdicom encodes it (implicit VR little endian): CommandField 0x0FFF
_C_CANCEL_FIELD = b"\x00\x00\x00\x01\x02\x00\x00\x00\xff\x0f"


class CancelOnFirstMatch:
    """A TCP relay in front of the listener that passes the requestor's C-CANCEL-RQ on at the moment
    the SCP's first C-FIND-RSP reaches the relay, and holds the answers back until it has.

    Why: sent as a requestor normally would (after its first match has been decoded), the C-CANCEL
    races the SCP through several threads of this one process, and under load the SCP won (all 600
    matches, then 0x0000). Sent earlier, pynetdicom drops it: it clears C-CANCELs that arrive before
    the service starts. Sent here, it follows the first answer by one socket write.
    """

    def __init__(self, target_port: int) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._target_port = target_port
        self.find_passed = threading.Event()  # the C-FIND-RQ is on its way to the SCP
        self._answering = threading.Event()  # the SCP's first C-FIND-RSP reached the relay
        self._cancel_passed = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._serve_one, daemon=True).start()

    def _serve_one(self) -> None:
        requestor, _ = self._server.accept()
        scp = socket.create_connection(("127.0.0.1", self._target_port))
        for sock in (requestor, scp):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=self._answers, args=(scp, requestor), daemon=True).start()
        while pdu := _read_pdu(requestor):
            if pdu[0] == 0x04 and _C_CANCEL_FIELD in pdu:
                self._answering.wait(60)
                scp.sendall(pdu)
                self._cancel_passed.set()
                continue
            scp.sendall(pdu)
            if pdu[0] == 0x04:
                self.find_passed.set()
        scp.shutdown(socket.SHUT_WR)

    def _answers(self, scp: socket.socket, requestor: socket.socket) -> None:
        while pdu := _read_pdu(scp):
            if pdu[0] == 0x04 and not self._answering.is_set():
                self._answering.set()
                self._cancel_passed.wait(60)
            requestor.sendall(pdu)
        requestor.shutdown(socket.SHUT_WR)


def _read_pdu(sock: socket.socket) -> bytes:
    header = sock.recv(6, socket.MSG_WAITALL)
    if len(header) < 6:
        return b""
    return header + sock.recv(int.from_bytes(header[2:6], "big"), socket.MSG_WAITALL)


def test_c_cancel_stops_a_long_c_find_with_fe00(listener: DicomListener, tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    # enough matches that answering them all takes far longer than reading a C-CANCEL:
    # headers only, so that storing them is quick
    ds = dcmread(CT_SMALL)
    del ds.PixelData
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for i in range(MATCHES):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    proc = subprocess.run(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(listener.port), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, env=DCMTK_ENV)
    assert proc.returncode == 0, proc.stderr

    relay = CancelOnFirstMatch(listener.port)
    relay.start()
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", relay.port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = ds.StudyInstanceUID
    query.SeriesInstanceUID = ds.SeriesInstanceUID
    query.SOPInstanceUID = ""
    context_id = assoc.accepted_contexts[0].context_id
    statuses: list[int] = []

    def find() -> None:
        for status, _identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7):
            statuses.append(int(status.Status))

    finder = threading.Thread(target=find)
    try:
        finder.start()
        assert relay.find_passed.wait(30), "the C-FIND-RQ went through the relay"
        assoc.send_c_cancel(7, context_id)
        finder.join(120)
    finally:
        assoc.release()
    assert statuses and statuses[-1] == 0xFE00, f"the find ends as cancelled, not {statuses[-1:]}"
    assert all(s == 0xFF00 for s in statuses[:-1])
    # an SCP that ignored the C-CANCEL would send all of them and end with 0x0000
    assert len(statuses) - 1 < MATCHES, "the SCP stopped sending matches once cancelled"
