"""A segmentation recorded for a stored CT series becomes, through the real report writer, Observations of each
structure's volume (coded bodySite, mL, derived from the ImagingStudy) that the DiagnosticReport lists as its
results, sent upstream with it, and a PACS export owed even without a classification finding."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from inference.imaging.segmentation import record_segmentation
from integration.db.artifacts import get_artifact
from integration.db.store import Store
from integration.db.tables import AiResult
from integration.delivery import queue
from integration.delivery.plan import Destinations
from integration.errors import PermanentEventError
from integration.fhir.resources import store_resource, validate_resource
from integration.fhir.storage import get_resource
from integration.reports.writer import write_report
from schemas.events import ClinicalInferenceCompleted, ImagingInferenceCompleted, SegmentationFinding
from tests.inference.imaging.ct_series import ct_series, liver_and_lesion, stored_instance, voxel_ml

UPSTREAM = "http://ehr.example.org/fhir"


def result_with(finding: SegmentationFinding, study_uid: str) -> ImagingInferenceCompleted:
    return ImagingInferenceCompleted(
        source_event_id=str(uuid.uuid4()), study_instance_uid=study_uid, revision=1, patient_ref="Patient/p1",
        imaging_study_ref="ImagingStudy/s1", model_name=finding.model_name, model_version=finding.model_version,
        findings=[], segmentations=[finding])


def test_a_recorded_segmentation_becomes_the_reports_volume_observations(store: Store, tmp_path: Path) -> None:
    series = ct_series(tmp_path)
    with store.session() as s:
        s.add_all([stored_instance(ds) for ds in series])
    study_uid = str(series[0].StudyInstanceUID)
    output = liver_and_lesion(series)

    # the headers come from the stored instances, as the imaging worker would find them
    finding = record_segmentation(store, output, study_instance_uid=study_uid, revision=1)
    assert get_artifact(store, finding.seg_artifact_id).media_type == "application/dicom"
    report_id = write_report(store, result_with(finding, study_uid), Destinations(ehr=(UPSTREAM,), pacs=("PACS",)))

    report = get_resource(store, "DiagnosticReport", report_id)
    refs = [r["reference"] for r in report["result"]]
    liver, lesion = (get_resource(store, "Observation", ref.split("/")[1]) for ref in refs)
    assert liver["bodySite"]["coding"] == [{"system": "http://snomed.info/sct", "code": "10200004",
                                            "display": "Liver"}]
    assert lesion["bodySite"]["coding"][0]["code"] == "52988006"
    assert liver["valueQuantity"]["code"] == "mL"
    assert liver["valueQuantity"]["value"] == pytest.approx(400 * voxel_ml(series), abs=1e-3)
    assert lesion["valueQuantity"]["value"] == pytest.approx(30 * voxel_ml(series), abs=1e-3)
    assert liver["derivedFrom"] == [{"reference": "ImagingStudy/s1"}]
    assert (liver["status"], liver["subject"]) == ("preliminary", {"reference": "Patient/p1"})
    assert "liver 0.4 mL" in report["conclusion"] and "could be analysed" not in report["conclusion"]

    with store.session() as s:
        ai = s.get(AiResult, report_id)
        assert ai is not None and ai.details["segmentations"][0]["seg_artifact_id"] == finding.seg_artifact_id
        assert queue.issued_job(s, "pacs", "PACS", report_id) is not None  # a SEG alone is worth exporting
        upstream = queue.issued_job(s, "ehr", UPSTREAM, report_id)
        assert upstream is not None
        sent = [e["resource"] for e in upstream.payload["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert [o["bodySite"]["text"] for o in sent] == ["liver", "lesion"]
    assert all("id" not in o for o in sent)  # the EHR assigns its own ids

    # a redelivered result rewrites the same Observations
    again = write_report(store, result_with(finding, study_uid))
    assert get_resource(store, "DiagnosticReport", again)["result"] == report["result"]


def test_an_event_naming_a_seg_the_store_does_not_hold_is_refused(store: Store, tmp_path: Path) -> None:
    series = ct_series(tmp_path, slices=3)
    study_uid = str(series[0].StudyInstanceUID)
    finding = record_segmentation(store, liver_and_lesion(series), study_instance_uid=study_uid, revision=1,
                                  sources={str(ds.SOPInstanceUID): ds for ds in series})
    forged = finding.model_copy(update={"seg_artifact_id": "0" * 64})
    with pytest.raises(PermanentEventError, match="SEG artifact"):
        write_report(store, result_with(forged, study_uid))


def test_a_clinical_reports_input_observations_are_not_sent_upstream_as_results(store: Store) -> None:
    # a clinical report's result names the patient's own Observations it read: the EHR has them already
    observation = {"resourceType": "Observation", "id": "hb", "status": "final", "code": {"text": "Haemoglobin"},
                   "subject": {"reference": "Patient/p1"},
                   "identifier": [{"system": "urn:hospital:lab", "value": "hb-1"}]}
    with store.session() as s:
        store_resource(s, validate_resource(observation))
    event = ClinicalInferenceCompleted(source_event_id=str(uuid.uuid4()), patient_ref="Patient/p1", revision=1,
                                       model_name="llm", impression="Anaemia.", evidence=[],
                                       input_refs=["Observation/hb"])
    report_id = write_report(store, event, Destinations(ehr=(UPSTREAM,)))
    assert get_resource(store, "DiagnosticReport", report_id)["result"] == [{"reference": "Observation/hb"}]
    with store.session() as s:
        upstream = queue.issued_job(s, "ehr", UPSTREAM, report_id)
        assert upstream is not None
        kinds = [e["resource"]["resourceType"] for e in upstream.payload["entry"]]
    assert "Observation" not in kinds
