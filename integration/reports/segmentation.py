"""Segmentation results in the imaging report: one FHIR Observation per segment, and the report's lines.

Each segment of each SEG (``ImagingInferenceCompleted.segmentations``, made by
inference.imaging.segmentation) becomes an AI-asserted, preliminary Observation of the structure's volume:
``bodySite`` the segmented structure (SNOMED CT, as coded in the SEG), ``valueQuantity`` the volume in mL
(UCUM), ``derivedFrom`` the ImagingStudy, ``method`` the model. The DiagnosticReport lists them in
``result``; they are written in the report's transaction (integration.reports.writer). Their ids derive
from the report and the segment, so a redelivered result rewrites the same Observations.
"""

from __future__ import annotations

import logging
from typing import Any

from integration.db.artifacts import stored_artifact_ids
from integration.db.store import Store
from integration.db.tables import stable_id
from integration.errors import PermanentEventError
from integration.fhir.resources import AI_ASSERTED
from schemas.events import ImagingInferenceCompleted, SegmentationFinding, SegmentMeasurement

log = logging.getLogger(__name__)

OBSERVATION_SYSTEM = "urn:medbridge:observation"  # as the EHR writeback's (integration.delivery.ehr.payload)
UCUM = "http://unitsofmeasure.org"
VOLUME = {"system": "http://snomed.info/sct", "code": "118565006", "display": "Volume"}
IMAGING = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
           "display": "Imaging"}


def observation_id(report_id: str, finding: SegmentationFinding, segment: SegmentMeasurement) -> str:
    return stable_id("segment-observation", report_id, finding.sop_instance_uid, str(segment.segment_number))


def segment_observation(report: dict[str, Any], event: ImagingInferenceCompleted, finding: SegmentationFinding,
                        segment: SegmentMeasurement) -> dict[str, Any]:
    """The Observation of one segment's volume (see the module docstring)."""
    oid = observation_id(report["id"], finding, segment)
    site = segment.body_site
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": OBSERVATION_SYSTEM, "value": oid}],
        "status": "preliminary",
        "category": [{"coding": [IMAGING]}],
        "code": {"coding": [VOLUME], "text": f"Volume of {segment.label} (AI segmentation)"},
        "issued": report["issued"],
        "bodySite": {"coding": [{"system": site.system, "code": site.code, "display": site.display}],
                     "text": segment.label},
        "valueQuantity": {"value": segment.volume_ml, "unit": "mL", "system": UCUM, "code": "mL"},
        "method": {"text": f"AI segmentation: {finding.model_name} {finding.model_version}, segment "
                           f"{segment.segment_number} of DICOM SEG {finding.sop_instance_uid}"},
    }
    if event.patient_ref:
        obs["subject"] = {"reference": event.patient_ref}
    if event.imaging_study_ref:
        obs["derivedFrom"] = [{"reference": event.imaging_study_ref}]
    return obs


def segment_observations(report: dict[str, Any], event: ImagingInferenceCompleted) -> list[dict[str, Any]]:
    """Every segment's Observation, in the order of the SEGs and their segments."""
    return [segment_observation(report, event, finding, segment)
            for finding in event.segmentations for segment in finding.segments]


def segmentation_lines(event: ImagingInferenceCompleted) -> list[str]:
    """The report conclusion's sentence per segmentation: the model and each structure's volume."""
    lines = []
    for finding in event.segmentations:
        volumes = ", ".join(f"{s.label.replace('_', ' ')} {s.volume_ml:.1f} mL" for s in finding.segments)
        lines.append(f"Segmentation by {finding.model_name} {finding.model_version}: {volumes or 'no segment'}.")
    return lines


def check_segs_stored(store: Store, event: ImagingInferenceCompleted) -> None:
    """Refuse (PermanentEventError) an event naming a SEG the artifact store does not hold: the imaging
    worker stores each SEG before its event, so such an event comes from elsewhere, and a report would
    state volumes whose segmentation nobody could open or export."""
    named = {f.seg_artifact_id for f in event.segmentations}
    missing = named - stored_artifact_ids(store, named)
    if missing:
        raise PermanentEventError(
            f"event {event.event_id} names {len(missing)} DICOM SEG artifact(s) the store does not hold; "
            "record segmentations with inference.imaging.segmentation.record_segmentation, which stores them")
