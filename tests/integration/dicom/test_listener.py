"""The DICOM listener against real peers: pynetdicom and dcmtk over real associations."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from integration.app.settings import DicomPeer
from integration.db.store import Store
from integration.db.tables import OutboxEntry
from integration.dicom.network.listener import DicomListener
from integration.events.publisher import QuietPeriodPublisher, announce_study
from integration.fhir.resources import store_resource
from integration.fhir.storage import get_resource
from schemas.events import StudyReceived

CT_SMALL = get_testdata_file("CT_small.dcm")
MR_SMALL = get_testdata_file("MR_small.dcm")


def associate(port: int, *contexts: tuple[str, str]):  # noqa: ANN201
    ae = AE(ae_title="TEST_SCU")
    for abstract, ts in contexts:
        ae.add_requested_context(abstract, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    return assoc


def test_dcmtk_echoscu_gets_success(listener: DicomListener) -> None:
    proc = subprocess.run(["echoscu", "-aec", "MEDBRIDGE", "127.0.0.1", str(listener.port)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_stored_instances_are_on_disk_and_in_the_store_when_the_association_is_released(
    listener: DicomListener, store: Store
) -> None:
    proc = subprocess.run(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(listener.port), CT_SMALL, MR_SMALL],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for src in (CT_SMALL, MR_SMALL):
        original = dcmread(src)
        row = store.get_instance(original.SOPInstanceUID)
        assert row is not None and row.is_image
        stored = dcmread(row.path)
        assert stored.PixelData == original.PixelData
        assert stored.SOPInstanceUID == original.SOPInstanceUID
    # nothing half-written is left beside the instances
    assert not [p for p in Path(listener.storage_dir).rglob("*.tmp")]


def test_compressed_transfer_syntaxes_are_accepted_as_sent(listener: DicomListener, store: Store) -> None:
    # one file per transfer syntax, each with its own SOP Instance UID
    for name in ("JPEG2000.dcm", "SC_rgb_rle.dcm", "JPEG-LL.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "emri_small_jpeg_2k_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm"):
        ds = dcmread(get_testdata_file(name))
        assoc = associate(listener.port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        assert status.Status == 0x0000, name
        row = store.get_instance(ds.SOPInstanceUID)
        assert row is not None and row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID


def test_truncated_dataset_is_refused_and_the_association_goes_on(
    listener: DicomListener, store: Store, tmp_path: Path
) -> None:
    data = Path(CT_SMALL).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) // 2])
    assoc = associate(listener.port, ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"))
    try:
        bad = assoc.send_c_store(str(truncated))
        good = assoc.send_c_store(CT_SMALL)
    finally:
        assoc.release()
    assert bad.Status == 0xC210
    assert good.Status == 0x0000
    assert store.get_instance(dcmread(CT_SMALL).SOPInstanceUID) is not None


def test_a_sop_instance_uid_that_would_leave_the_storage_folder_is_refused(
    listener: DicomListener, store: Store, tmp_path: Path
) -> None:
    """The SOP Instance UID names the instance's file: '../' in it must not put a file elsewhere."""
    ds = dcmread(CT_SMALL)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2/../../../../escaped"
    assoc = associate(listener.port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
    try:
        bad = assoc.send_c_store(ds)
        good = assoc.send_c_store(CT_SMALL)
    finally:
        assoc.release()
    assert bad.Status == 0xC211
    assert good.Status == 0x0000
    assert not list(tmp_path.parent.rglob("*escaped*")), "no file outside the storage folder"
    assert store.get_instance(ds.SOPInstanceUID) is None


def test_nul_in_text_and_a_12_digit_number_are_stored_and_found_on_both_engines(
    listener: DicomListener, store: Store
) -> None:
    """PostgreSQL refuses NUL in text and integers beyond 32 bits: the instance is stored all the same
    (the file as sent, the columns without the NUL, the number left out) and C-FIND finds it."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "NUL\x00ID"
    ds.PatientName = "Doe\x00^John"
    ds.StudyDescription = "Chest\x00 CT"
    ds.SeriesNumber = "99999999999"
    assoc = associate(listener.port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    row = store.get_instance(ds.SOPInstanceUID)
    assert row is not None, "the row is in the store"
    assert (row.patient_id, row.patient_name, row.study_description) == ("NULID", "Doe^John", "Chest CT")
    assert row.series_number is None
    assert dcmread(row.path).PatientID == "NUL\x00ID", "the file keeps what was sent"

    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    find = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", "NULID", ""
    try:
        found = [i.StudyInstanceUID for s, i in find.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                 if s.Status == 0xFF00]
    finally:
        find.release()
    assert found == [ds.StudyInstanceUID]


def test_unwritable_storage_answers_out_of_resources(listener: DicomListener, store: Store) -> None:
    # root ignores permission bits, so make the folder unusable by putting a file where it must be
    ds = dcmread(CT_SMALL)
    from integration.phi import folder_name

    Path(listener.storage_dir).mkdir(parents=True, exist_ok=True)
    (Path(listener.storage_dir) / folder_name(ds.StudyInstanceUID)).write_bytes(b"not a folder")
    assoc = associate(listener.port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID),
                      ("1.2.840.10008.1.1", "1.2.840.10008.1.2"))
    try:
        status = assoc.send_c_store(ds)
        echo = assoc.send_c_echo()
    finally:
        assoc.release()
    assert status.Status == 0xA700
    assert echo.Status == 0x0000  # the association survives the failure
    assert store.get_instance(ds.SOPInstanceUID) is None


def test_duplicate_instance_keeps_the_first_and_answers_a_warning(listener: DicomListener, store: Store) -> None:
    first = dcmread(CT_SMALL)
    second = dcmread(CT_SMALL)
    second.InstanceNumber = 99  # same SOP Instance UID, other content: the copy already held stands
    statuses = []
    for ds in (first, second):
        assoc = associate(listener.port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
        try:
            statuses.append(assoc.send_c_store(ds))
        finally:
            assoc.release()
    assert statuses[0].Status == 0x0000
    assert statuses[1].Status == 0xB000 and "Duplicate" in statuses[1].ErrorComment
    held = store.study_instances(first.StudyInstanceUID)
    assert len(held) == 1 and dcmread(held[0].path).InstanceNumber == first.InstanceNumber
    # dcmtk treats the warning as stored: exit status 0
    proc = subprocess.run(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(listener.port), CT_SMALL],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_duplicate_status_can_be_plain_success(store: Store, tmp_path: Path) -> None:
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, duplicate_status="success")
    lst.start()
    try:
        ds = dcmread(CT_SMALL)
        assoc = associate(lst.port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
        try:
            assert [assoc.send_c_store(ds).Status for _ in range(2)] == [0x0000, 0x0000]
        finally:
            assoc.release()
    finally:
        lst.stop()


def test_released_study_is_announced_once_with_its_imaging_study(listener: DicomListener, store: Store) -> None:
    proc = subprocess.run(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(listener.port), CT_SMALL],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    publisher = QuietPeriodPublisher(store, "study", 60, announce_study)
    # the association's release made the study due despite the 60 s quiet period
    assert publisher.publish_due() == 1
    assert publisher.publish_due() == 0
    with store.session() as s:
        rows = list(s.scalars(select(OutboxEntry)))
    assert len(rows) == 1
    event = StudyReceived.model_validate_json(rows[0].payload)
    assert event.revision == 1 and event.instance_count == 1
    study = get_resource(store, "ImagingStudy", event.imaging_study_ref.split("/")[1])
    assert study["series"][0]["instance"][0]["uid"] == dcmread(CT_SMALL).SOPInstanceUID
    patient = get_resource(store, "Patient", event.patient_ref.split("/")[1])
    assert patient["identifier"][0]["value"] == str(dcmread(CT_SMALL).PatientID)


def test_below_the_free_space_floor_instances_are_refused_with_a700(store: Store, tmp_path: Path) -> None:
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, min_free_bytes=2**62)
    lst.start()
    try:
        assert not lst.has_free_space()
        ds = dcmread(CT_SMALL)
        assoc = associate(lst.port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
        try:
            assert assoc.send_c_store(ds).Status == 0xA700
        finally:
            assoc.release()
        assert store.get_instance(ds.SOPInstanceUID) is None
    finally:
        lst.stop()


def test_unknown_callers_and_wrong_called_ae_are_rejected_at_association(store: Store, tmp_path: Path) -> None:
    peers = [DicomPeer(ae_title="PACS1", host="localhost"), DicomPeer(ae_title="FARAWAY", host="192.0.2.7")]
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, peers=peers)
    lst.start()
    try:
        def try_associate(calling: str, called: str) -> bool:
            ae = AE(ae_title=calling)
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", lst.port, ae_title=called)
            ok = assoc.is_established
            if ok:
                assoc.release()
            return ok and not assoc.is_rejected

        assert try_associate("PACS1", "MEDBRIDGE")
        assert not try_associate("STRANGER", "MEDBRIDGE")
        assert not try_associate("PACS1", "SOMEONE_ELSE")
        assert not try_associate("FARAWAY", "MEDBRIDGE")  # a known AE title, called from the wrong host
        proc = subprocess.run(["echoscu", "-aet", "STRANGER", "-aec", "MEDBRIDGE", "127.0.0.1", str(lst.port)],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and "Rejected" in proc.stdout + proc.stderr
    finally:
        lst.stop()


def test_administrator_can_allow_any_caller_beside_peers(store: Store, tmp_path: Path) -> None:
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60, peers=[DicomPeer(ae_title="PACS1", host="192.0.2.7")],
                        allow_any_caller=True)
    lst.start()
    try:
        proc = subprocess.run(["echoscu", "-aet", "STRANGER", "-aec", "MEDBRIDGE", "127.0.0.1", str(lst.port)],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    finally:
        lst.stop()


def test_stored_file_meta_is_what_pydicom_reads_and_the_data_set_is_byte_for_byte_as_sent(
    listener: DicomListener, store: Store
) -> None:
    sent = Path(get_testdata_file("JPEG2000.dcm"))  # compressed: stored as received, not transcoded
    original = dcmread(sent)
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(original.SOPClassUID, original.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="MEDBRIDGE")
    try:
        assert assoc.send_c_store(sent).Status == 0x0000  # a path: pynetdicom sends the file's bytes as they are
    finally:
        assoc.release()
    held = store.get_instance(original.SOPInstanceUID)
    assert held is not None
    stored = dcmread(held.path)
    meta = stored.file_meta
    assert meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert meta.SourceApplicationEntityTitle == "MODALITY1"
    assert meta.ImplementationVersionName == "MEDBRIDGE_010"
    data_offset = 132 + 12 + meta.FileMetaInformationGroupLength
    assert Path(held.path).read_bytes()[data_offset:] == _data_set_bytes(sent)
    assert stored.PixelData == original.PixelData


def _data_set_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file without its preamble and meta group."""
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return raw[132 + 12 + meta.FileMetaInformationGroupLength:]


def test_a_study_after_the_ehr_sent_its_patient_links_to_it_not_to_the_header_patient(
    listener: DicomListener, store: Store
) -> None:
    """The first study arrives before the EHR's Patient: a Patient is made from its header. A later
    study of the same Patient ID links to the EHR's Patient once there is one."""
    publisher = QuietPeriodPublisher(store, "study", 60, announce_study)

    def store_and_announce(ds) -> None:  # noqa: ANN001
        assoc = associate(listener.port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        assert publisher.publish_due() == 1

    first = dcmread(CT_SMALL)
    store_and_announce(first)
    with store.session() as s:
        ehr = {"resourceType": "Patient", "id": "ehr-patient",
               "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": str(first.PatientID)}]}
        store_resource(s, ehr)
    later = dcmread(CT_SMALL)
    later.StudyInstanceUID, later.SeriesInstanceUID = generate_uid(), generate_uid()
    later.SOPInstanceUID = later.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    store_and_announce(later)
    with store.session() as s:
        events = [StudyReceived.model_validate_json(row.payload)
                  for row in s.scalars(select(OutboxEntry).order_by(OutboxEntry.id))
                  if row.event_type == "StudyReceived"]
    header_patient, linked = (e.patient_ref for e in events)
    assert header_patient != "Patient/ehr-patient"
    assert get_resource(store, "Patient", header_patient.split("/")[1])["identifier"][0]["value"] == first.PatientID
    assert linked == "Patient/ehr-patient"
