"""The PACS export follows the report and its review through the one delivery queue, with Orthanc as
the export peer: nothing depends on a ReportIssued event reaching a consumer, and the SR in the PACS
says what the clinician decided.

The AI result is written by the real report writer (``write_report``, as the report-writer worker
calls it) for pydicom's CT_small, which the store holds; no inference runs, so these tests are quick.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
from pydicom.data import get_testdata_file
from sqlalchemy import select

from integration.app.runtime import Runtime
from integration.app.settings import DicomPeer
from integration.db.tables import OutboxEntry
from integration.delivery.pacs.export import export_uid
from integration.delivery.plan import Destinations
from integration.reports.writer import write_report
from schemas.events import TOPIC_REPORT_ISSUED, ImagingInferenceCompleted, InstanceFinding
from tests import authorized
from tests.conftest import stack_settings
from tests.integration.delivery.pacs.test_dicom_export import base_url, poll, source_instance

CT_SMALL = get_testdata_file("CT_small.dcm")


def ct_small_result() -> ImagingInferenceCompleted:
    ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    return ImagingInferenceCompleted(
        source_event_id=str(uuid.uuid4()), study_instance_uid=ds.StudyInstanceUID, revision=1, patient_ref=None,
        imaging_study_ref=None, model_name="demo-lesion-densenet", model_version="0.1.0",
        findings=[InstanceFinding(sop_instance_uid=ds.SOPInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                                  probabilities={"synthetic_round_lesion": 0.91})],
    )


def settings_for(tmp_path: Path, orthanc: Any, workers: str) -> Any:
    """MedBridge with Orthanc as its export peer; no DICOM listener and no inference."""
    peer = DicomPeer(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, export=True)
    return stack_settings(tmp_path, workers=workers, dicom_enabled=False, dicom_peers=[peer],
                          dicom_export_backoff_seconds=0.3, dicom_export_max_backoff_seconds=2.0,
                          dicom_export_timeout_seconds=10.0)


async def issue_ct_small_report(rt: Runtime) -> str:
    """Store CT_small and write its AI report, with the deliveries the settings ask for."""
    with rt.store.session() as s:
        s.add(source_instance(CT_SMALL))
    report_id = await asyncio.to_thread(write_report, rt.store, ct_small_result(),
                                        Destinations.from_settings(rt.settings))
    rt.notify_outbox()
    return report_id


def srs_in_orthanc(orthanc: Any) -> dict[str, pydicom.Dataset]:
    """Every SR Orthanc holds in CT_small's study, by SOP Instance UID."""
    study_uid = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).StudyInstanceUID
    found = {}
    with orthanc.rest() as rest:
        for series in orthanc.series_of_study(study_uid):
            if series["MainDicomTags"]["Modality"] != "SR":
                continue
            for instance in series["Instances"]:
                ds = pydicom.dcmread(io.BytesIO(rest.get(f"/instances/{instance}/file").content))
                found[str(ds.SOPInstanceUID)] = ds
    return found


def texts(sr: pydicom.Dataset) -> dict[str, list[str]]:
    doc = hd.sr.ComprehensiveSR.from_dataset(sr)
    out: dict[str, list[str]] = {}
    for item in hd.sr.utils.find_content_items(doc, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True):
        out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
    return out


async def test_a_lost_report_issued_event_still_leads_to_the_pacs_export(tmp_path: Path, orthanc: Any) -> None:
    # the report is written by a MedBridge whose broker then dies: ReportIssued was published to it,
    # and nothing consumed it (no exporter runs there)
    first = Runtime(settings_for(tmp_path, orthanc, workers="reports"))
    await first.start()
    try:
        report_id = await issue_ct_small_report(first)

        def published() -> bool:
            with first.store.session() as s:
                entry = s.scalars(select(OutboxEntry).where(OutboxEntry.topic == TOPIC_REPORT_ISSUED)).one()
                return entry.published_at is not None

        await poll(published, timeout=60, what="ReportIssued published")
    finally:
        await first.stop()  # the embedded broker is memory only: the event is gone with it
    assert srs_in_orthanc(orthanc) == {}

    # MedBridge starts again on the same database, with an empty broker, and runs the exporter
    second = Runtime(settings_for(tmp_path, orthanc, workers="dicom-export"))
    await second.start()
    try:
        exported = await poll(lambda: srs_in_orthanc(orthanc), timeout=90, what="the SR in Orthanc")
        assert list(exported) == [export_uid(report_id, "sr-instance")]
        (sr,) = exported.values()
        assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
        async with authorized.AsyncClient(base_url=base_url(second), timeout=30) as client:
            (row,) = (await client.get("/api/dicom-exports")).json()
            assert (row["report_id"], row["destination_ae"], row["what"], row["state"]) == (
                report_id, "ORTHANC", "issued", "sent")
    finally:
        await second.stop()


async def as_reviewer(client: httpx.AsyncClient, report_id: str, name: str) -> dict[str, str]:
    """The headers of a review by ``name`` (a reviewer's token) of the report's current version."""
    etag = (await client.get(f"/api/reports/{report_id}")).headers["ETag"]
    token = authorized.issuer().mint(subject=name.lower().replace(" ", "-"), roles=["reviewer"], name=name)
    return {"If-Match": etag, "Authorization": f"Bearer {token}"}


async def test_a_reviewed_results_sr_in_orthanc_carries_the_review_outcome(tmp_path: Path, orthanc: Any) -> None:
    rt = Runtime(settings_for(tmp_path, orthanc, workers="dicom-export"))
    await rt.start()
    try:
        report_id = await issue_ct_small_report(rt)
        preliminary = export_uid(report_id, "sr-instance")
        await poll(lambda: preliminary in srs_in_orthanc(orthanc), timeout=90, what="the preliminary SR in Orthanc")
        async with authorized.AsyncClient(base_url=base_url(rt), timeout=30) as client:
            resp = await client.post(f"/api/reports/{report_id}/review", json={"action": "final"},
                                     headers=await as_reviewer(client, report_id, "Dr Final"))
            assert resp.status_code == 200, resp.text
            resp = await client.post(f"/api/reports/{report_id}/review", json={
                "action": "entered-in-error", "reason": "wrong-finding", "comment": "Wrong series analysed"},
                headers=await as_reviewer(client, report_id, "Dr Reject"))
            assert resp.status_code == 200, resp.text
            rejected_uid = export_uid(report_id, "sr-instance-review-2")
            srs = await poll(lambda: (found := srs_in_orthanc(orthanc)) and rejected_uid in found and found,
                             timeout=90, what="the rejected result's SR in Orthanc")
            exports = (await client.get("/api/dicom-exports")).json()
        assert sorted((e["what"], e["review_action"], e["state"]) for e in exports) == [
            ("issued", None, "sent"), ("reviewed", "entered-in-error", "sent"), ("reviewed", "final", "sent")]
    finally:
        await rt.stop()

    assert set(srs) == {preliminary, export_uid(report_id, "sr-instance-review-1"), rejected_uid}
    confirmed = srs[export_uid(report_id, "sr-instance-review-1")]
    assert texts(confirmed)["Clinician review outcome"] == ["final"]
    rejected = srs[rejected_uid]
    assert (rejected.CompletionFlag, rejected.VerificationFlag, rejected.PreliminaryFlag) == (
        "COMPLETE", "VERIFIED", "FINAL")
    assert rejected.VerifyingObserverSequence[0].VerifyingObserverName.family_name == "Dr Reject"
    content = texts(rejected)
    assert content["Clinician review outcome"] == ["entered-in-error"]
    assert content["Reviewer comment"] == ["Wrong series analysed"]
    assert any("entered in error and must not be used" in t for t in content["Comment"])
    assert rejected.SeriesDescription == "AI findings (entered in error)"
    predecessor = rejected.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == confirmed.SOPInstanceUID
    # the preliminary SR Orthanc received first is still there, still saying what it said
    assert srs[preliminary].VerificationFlag == "UNVERIFIED"
