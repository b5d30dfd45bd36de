"""The imaging worker over a real listener and store: a grown study's images are each inferred once."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from inference.imaging.operator import LesionDetector
from inference.imaging.worker import infer_study
from integration.db.store import Store
from integration.db.tables import OutboxEntry
from integration.dicom.network.listener import DicomListener
from integration.events.publisher import QuietPeriodPublisher, announce_study
from integration.reports.writer import imaging_report
from schemas.events import StudyReceived

CT_SMALL = get_testdata_file("CT_small.dcm")


def _send(port: int, *datasets, status: int = 0x0000) -> None:  # noqa: ANN002
    """The data sets on one association, each answered with ``status``."""
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    try:
        assert [assoc.send_c_store(ds).Status for ds in datasets] == [status] * len(datasets)
    finally:
        assoc.release()


def _announced(store: Store) -> list[StudyReceived]:
    with store.session() as s:
        rows = s.scalars(select(OutboxEntry).where(OutboxEntry.event_type == "StudyReceived").order_by(OutboxEntry.id))
        return [StudyReceived.model_validate_json(row.payload) for row in rows]


def _copy_in_study(first, series_uid: str):  # noqa: ANN001, ANN202 - another instance of the same study
    ds = dcmread(CT_SMALL)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = first.StudyInstanceUID
    return ds


def _announce_first(store: Store, listener: DicomListener):  # noqa: ANN202
    """CT_small sent and its study announced (revision 1); the publisher and the data set."""
    publisher = QuietPeriodPublisher(store, "study", 60, announce_study)
    first = dcmread(CT_SMALL)
    _send(listener.port, first)
    assert publisher.publish_due() == 1
    return publisher, first


def test_each_revision_infers_the_images_it_brought_and_a_replay_infers_the_same(
    store: Store, listener: DicomListener, detector: LesionDetector, tmp_path: Path
) -> None:
    publisher, first = _announce_first(store, listener)
    # the study grows: a new series on a later association, two images
    later = [_copy_in_study(first, generate_uid()) for _ in range(2)]
    later[1].SeriesInstanceUID = later[0].SeriesInstanceUID
    _send(listener.port, *later)
    assert publisher.publish_due() == 1

    revision1, revision2 = _announced(store)
    assert revision2.revision > revision1.revision
    assert (revision1.instance_count, revision2.instance_count) == (1, 3)
    result1 = infer_study(store, detector, tmp_path / "artifacts", revision1)
    result2 = infer_study(store, detector, tmp_path / "artifacts", revision2)
    assert result1 is not None and result2 is not None
    assert [f.sop_instance_uid for f in result1.findings] == [first.SOPInstanceUID]
    assert sorted(f.sop_instance_uid for f in result2.findings) == sorted(ds.SOPInstanceUID for ds in later)
    assert (result1.earlier_images, result2.earlier_images) == (0, 1)
    # at-least-once delivery: revision 1 redelivered after revision 2 is announced infers what it did
    again = infer_study(store, detector, tmp_path / "artifacts", revision1)
    assert again is not None and [f.sop_instance_uid for f in again.findings] == [first.SOPInstanceUID]
    # the grown revision's report says its images are the new ones
    report, details = imaging_report(result2)
    assert "received since this study's previous report" in report["conclusion"]
    assert len(details["instances"]) == 2
    first_report, _ = imaging_report(result1)
    assert "previous report" not in first_report["conclusion"]


def test_a_revision_that_brings_no_image_has_nothing_to_infer(
    store: Store, listener: DicomListener, detector: LesionDetector, tmp_path: Path
) -> None:
    publisher, first = _announce_first(store, listener)
    # the same instance again: a duplicate, the study does not grow, nothing is announced
    _send(listener.port, first, status=0xB000)
    assert publisher.publish_due() == 0
    (revision1,) = _announced(store)
    # a later revision whose instances are all announced already (as a non-image-only one would be)
    later = revision1.model_copy(update={"revision": revision1.revision + 1, "event_id": "e-later"})
    assert infer_study(store, detector, tmp_path / "artifacts", later) is None
