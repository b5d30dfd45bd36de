"""The PACS export sends a segmentation's DICOM SEG beside the SR, with Orthanc as the export peer: Orthanc
accepts the SEG, which reads back with highdicom, and the SR states each segment's volume and points at it.

The SEG is recorded by inference.imaging.segmentation for a CT series the store holds and the report written
by the real report writer (``write_report``); the running dicom-export worker sends what the report owes."""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from inference.imaging.segmentation import build_seg, measure_segments, record_segmentation, seg_file_bytes
from integration.app.runtime import Runtime
from integration.db.artifacts import artifact_id
from integration.db.tables import AiResult
from integration.delivery.pacs.export import ExportBuildError, ReviewOutcome, build_export, export_uid
from integration.delivery.plan import Destinations
from integration.reports.writer import write_report
from schemas.events import ImagingInferenceCompleted, InstanceFinding
from tests import authorized
from tests.inference.imaging.ct_series import ct_series, liver_and_lesion, stored_instance
from tests.integration.delivery.pacs.test_dicom_export import artifacts, base_url, poll
from tests.integration.delivery.pacs.test_export_follows_the_report import settings_for


def instances_by_modality(orthanc: Any, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """Every instance Orthanc holds in the study, read back as DICOM files, by modality."""
    found: dict[str, list[pydicom.Dataset]] = {}
    with orthanc.rest() as rest:
        for series in orthanc.series_of_study(study_uid):
            for instance in series["Instances"]:
                ds = pydicom.dcmread(io.BytesIO(rest.get(f"/instances/{instance}/file").content))
                found.setdefault(str(ds.Modality), []).append(ds)
    return found


async def test_the_pacs_export_sends_the_seg_beside_the_sr(tmp_path: Path, orthanc: Any) -> None:
    rt = Runtime(settings_for(tmp_path, orthanc, workers="dicom-export"))
    await rt.start()
    try:
        series = ct_series(tmp_path / "ct")
        with rt.store.session() as s:
            s.add_all([stored_instance(ds) for ds in series])
        study_uid = str(series[0].StudyInstanceUID)
        segmentation = await asyncio.to_thread(record_segmentation, rt.store, liver_and_lesion(series),
                                               study_instance_uid=study_uid, revision=1)
        # a classification finding on one slice too: its SR content and the SEG's go together
        event = ImagingInferenceCompleted(
            source_event_id=str(uuid.uuid4()), study_instance_uid=study_uid, revision=1, patient_ref=None,
            imaging_study_ref=None, model_name="demo-lesion-densenet", model_version="0.1.0",
            findings=[InstanceFinding(sop_instance_uid=str(series[2].SOPInstanceUID),
                                      series_instance_uid=str(series[2].SeriesInstanceUID),
                                      probabilities={"synthetic_round_lesion": 0.91})],
            segmentations=[segmentation])
        report_id = await asyncio.to_thread(write_report, rt.store, event, Destinations.from_settings(rt.settings))
        rt.notify_outbox()

        held = await poll(lambda: (found := instances_by_modality(orthanc, study_uid)).keys() >= {"SEG", "SR"}
                          and found, timeout=90, what="the SEG and the SR in Orthanc")
        async with authorized.AsyncClient(base_url=base_url(rt), timeout=30) as client:
            (row,) = (await client.get("/api/dicom-exports")).json()
        assert (row["report_id"], row["what"], row["state"]) == (report_id, "issued", "sent")
    finally:
        await rt.stop()

    (seg_ds,) = held["SEG"]
    assert (seg_ds.SOPClassUID, seg_ds.SOPInstanceUID) == (SegmentationStorage, segmentation.sop_instance_uid)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["liver", "lesion"]
    assert {uid for _, _, uid in seg.get_source_image_uids()} == {str(ds.SOPInstanceUID) for ds in series}

    (sr,) = held["SR"]
    assert sr.SOPInstanceUID == export_uid(report_id, "sr-instance")
    doc = hd.sr.ComprehensiveSR.from_dataset(sr)
    volumes = hd.sr.utils.find_content_items(doc, name=codes.SCT.Volume, recursive=True)
    assert [float(v.MeasuredValueSequence[0].NumericValue) for v in volumes] == [
        s.volume_ml for s in segmentation.segments]
    pointers = hd.sr.utils.find_content_items(doc, name=codes.DCM.Segmentation, recursive=True)
    assert {(p.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
             int(p.ReferencedSOPSequence[0].ReferencedSegmentNumber)) for p in pointers} == {
        (segmentation.sop_instance_uid, 1), (segmentation.sop_instance_uid, 2)}
    # the SR's evidence names the SEG, so a viewer opening the SR finds the segmentation
    evidence = {r.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert segmentation.sop_instance_uid in evidence


def test_a_reviewed_results_sr_still_carries_the_seg_and_a_lost_seg_is_a_build_error(tmp_path: Path) -> None:
    series = ct_series(tmp_path, slices=3)
    output = liver_and_lesion(series)
    seg = build_seg(output, series, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())
    data = seg_file_bytes(seg)
    segments = measure_segments(output, series)
    ai = AiResult(report_id="report-seg", kind="imaging", source_event_id="e-1",
                  study_instance_uid=str(series[0].StudyInstanceUID),
                  details={"model_name": output.model_name, "model_version": output.model_version, "instances": [],
                           "segmentations": [{"seg_artifact_id": artifact_id(data),
                                              "sop_instance_uid": str(seg.SOPInstanceUID),
                                              "model_name": output.model_name, "model_version": output.model_version,
                                              "segments": [s.model_dump(mode="json") for s in segments]}]})
    review = ReviewOutcome(number=1, action="final", reviewer="Dr Seg", at=datetime(2026, 1, 2, tzinfo=UTC))
    objects = build_export(ai, [stored_instance(ds) for ds in series], artifacts(data), review)

    assert [ds.Modality for ds in objects.datasets] == ["SEG", "SR"]  # the SEG first: the SR points at it
    assert objects.sr.VerificationFlag == "VERIFIED"
    sent_seg = objects.datasets[0]
    assert sent_seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # stored deflated, sent plain
    assert sent_seg.SOPInstanceUID == seg.SOPInstanceUID and int(sent_seg.NumberOfFrames) == 3
    with pytest.raises(ExportBuildError, match="SEG is not in the artifact store"):
        build_export(ai, [stored_instance(ds) for ds in series], artifacts(), review)
