"""The report writer: AI results in, FHIR R4 DiagnosticReports out (status ``preliminary``).

Reports carry the AI-asserted security label (``AIAST``, HL7 AI Transparency on FHIR), the
source study or the Observations they used, the conclusion, ICD-10-CM conclusion codes where the
cited evidence supports one, and the heatmap overlay as ``presentedForm``. A reviewer's action
later makes them ``final``, ``amended`` or ``entered-in-error``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import AiResult, FhirResource, stable_id, utcnow
from integration.delivery.ehr.sender import enqueue_report_issued, enqueue_report_reviewed
from integration.errors import InvalidResourceError, PermanentEventError, ResourceNotFoundError
from integration.events.broker import ConsumerWorker
from integration.fhir.resources import (
    AI_ASSERTED,
    MEDBRIDGE_IDENTIFIER_SYSTEM,
    fhir_string,
    store_resource,
    validate_resource,
)
from integration.fhir.storage import serialize_conditional
from integration.identity import Actor
from integration.reports import review as review_rules
from schemas.api import ReviewRequest
from schemas.events import (
    REPORT_WRITER,
    TOPIC_CLINICAL_COMPLETED,
    TOPIC_IMAGING_COMPLETED,
    TOPIC_REPORT_ISSUED,
    ClinicalInferenceCompleted,
    ImagingInferenceCompleted,
    MedBridgeEvent,
    ReportIssued,
)

log = logging.getLogger(__name__)

ICD10CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"


def _iso_now() -> str:
    return utcnow().isoformat(timespec="seconds").replace("+00:00", "Z")


def _base_report(report_id: str, patient_ref: str | None, code: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": MEDBRIDGE_IDENTIFIER_SYSTEM, "value": report_id}],
        "status": "preliminary",
        "code": code,
        "issued": _iso_now(),
    }
    if patient_ref:
        report["subject"] = {"reference": patient_ref}
    return report


def _images(n: int) -> str:
    return "1 image" if n == 1 else f"{n} images"


def imaging_report(event: ImagingInferenceCompleted, threshold: float = 0.5) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DiagnosticReport for an imaging result, and the details kept beside it for the viewer."""
    report_id = stable_id("imaging-report", event.study_instance_uid, str(event.revision))
    report = _base_report(
        report_id,
        event.patient_ref,
        {
            "coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
            "text": "AI imaging analysis",
        },
    )
    report["category"] = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}]}
    ]
    if event.imaging_study_ref:
        report["imagingStudy"] = [{"reference": event.imaging_study_ref}]
    findings = sorted(event.findings, key=lambda f: max(f.probabilities.values(), default=0.0), reverse=True)
    lines = [f"{event.model_name} {event.model_version} (demonstration model, not for clinical use)."]
    if event.earlier_images:
        lines.append(f"The images received since this study's previous report; its {_images(event.earlier_images)} "
                     "received before are in the earlier report(s).")
    if not findings:
        lines.append("No image in this study could be analysed.")
    else:
        for name in findings[0].probabilities:
            positives = [f for f in findings if f.probabilities.get(name, 0.0) >= threshold]
            top = max(f.probabilities.get(name, 0.0) for f in findings)
            label = name.replace("_", " ")
            if positives:
                found = f"suspected in {len(positives)} of {_images(len(findings))}"
                lines.append(f"{label}: {found} (highest probability {top:.2f}).")
            else:
                lines.append(f"{label}: not detected in {_images(len(findings))} (highest probability {top:.2f}).")
    if event.skipped_instances:
        lines.append(f"{event.skipped_instances} instance(s) could not be decoded and were not analysed.")
    report["conclusion"] = fhir_string(" ".join(lines))
    if findings and findings[0].heatmap_path and Path(findings[0].heatmap_path).is_file():
        report["presentedForm"] = [
            {
                "contentType": "image/png",
                "title": "Heatmap (Grad-CAM) over the image with the highest probability",
                "data": base64.b64encode(Path(findings[0].heatmap_path).read_bytes()).decode(),
            }
        ]
    details = {
        "model_name": event.model_name,
        "model_version": event.model_version,
        "instances": [f.model_dump() for f in findings],
        "skipped_instances": event.skipped_instances,
    }
    return report, details


def clinical_report(event: ClinicalInferenceCompleted) -> tuple[dict[str, Any], dict[str, Any]]:
    report_id = stable_id("clinical-report", event.patient_ref, str(event.revision))
    report = _base_report(
        report_id,
        event.patient_ref,
        {
            "coding": [{"system": "http://loinc.org", "code": "51855-5", "display": "Patient Note"}],
            "text": "AI clinical impression",
        },
    )
    observations = [r for r in event.input_refs if r.startswith("Observation/")]
    if observations:
        report["result"] = [{"reference": r} for r in observations]
    sources = [f"[{i}] {p.title} ({p.source})" for i, p in enumerate(event.evidence, start=1) if p.cited]
    conclusion = event.impression.strip()
    if sources:
        conclusion += "\n\nCited sources: " + "; ".join(sources)
    report["conclusion"] = fhir_string(conclusion)  # a model's text: it may hold control characters
    if event.conclusion_codes:
        report["conclusionCode"] = [
            {"coding": [{"system": ICD10CM_SYSTEM, "code": code, "display": display}]}
            for code, display in event.conclusion_codes
        ]
    details = {
        "model_name": event.model_name,
        "model_version": None,
        "evidence": [p.model_dump() for p in event.evidence],
        "input_refs": event.input_refs,
    }
    return report, details


def _store_report(
    s: Session,
    report: dict[str, Any],
    details: dict[str, Any],
    kind: str,
    event: MedBridgeEvent,
    study_uid: str | None,
    upstreams: Sequence[str] = (),
) -> None:
    validate_resource(report)
    store_resource(s, report, track=False)
    row = s.get(AiResult, report["id"])
    if row is None:
        row = AiResult(report_id=report["id"], kind=kind, source_event_id=event.event_id)
        s.add(row)
    row.source_event_id = event.event_id
    row.subject_ref = (report.get("subject") or {}).get("reference")
    row.study_instance_uid = study_uid
    row.details = details
    issued = ReportIssued(report_id=report["id"], source_event_id=event.event_id, patient_ref=row.subject_ref)
    Store.add_to_outbox(s, TOPIC_REPORT_ISSUED, issued, key=report["id"])
    Store.mark_processed(s, REPORT_WRITER, event.event_id)
    enqueue_report_issued(s, report, details, upstreams)  # same transaction: the writeback cannot be lost


def write_report(store: Store, event: MedBridgeEvent, upstreams: Sequence[str] = ()) -> str:
    """Build, validate and store the report for one result event, in one transaction. Idempotent:
    the report id derives from the study (or patient) and revision, so a replay rewrites it.
    ``upstreams``: the EHR FHIR base URLs the report is queued for (integration.delivery.ehr.sender)."""
    if isinstance(event, ImagingInferenceCompleted):
        report, details = imaging_report(event)
        kind, study = "imaging", event.study_instance_uid
    elif isinstance(event, ClinicalInferenceCompleted):
        report, details = clinical_report(event)
        kind, study = "clinical", None
    else:
        raise PermanentEventError(f"report writer cannot handle {event.event_type}")
    try:
        with store.session() as s:
            _store_report(s, report, details, kind, event, study, upstreams)
    except InvalidResourceError as exc:
        raise PermanentEventError(f"generated report is not valid FHIR: {exc}") from exc
    log.info("report %s issued (%s) for event %s", report["id"], kind, event.event_id)
    return report["id"]


def apply_review(
    store: Store, report_id: str, review: ReviewRequest, actor: Actor, if_match: int,
    upstreams: Sequence[str] = (), audit_in: Callable[[Session, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Record ``actor``'s decision on the report at version ``if_match`` and move it to its new status (one
    new version), by the rules of integration.reports.review (409 refused transition, 412 stale version),
    with its Provenance, ``reviews`` row and (``audit_in(session, new version)``) AuditEvent, and queue the
    update for each upstream EHR in ``upstreams``: all in the same transaction."""
    review_rules.check_request(review)
    with store.session() as s:
        # reviews of one report take turns from the read to the commit: the second of two decisions on the
        # same version then reads the first's version and is refused, instead of overwriting it
        serialize_conditional(s, [f"review:{report_id}"])
        row = s.get(FhirResource, ("DiagnosticReport", report_id), with_for_update=True)
        if row is None or s.get(AiResult, report_id) is None:
            raise ResourceNotFoundError("DiagnosticReport", report_id)
        report = review_rules.decided_report(row.content, review, actor, if_match)
        stored, _ = store_resource(s, validate_resource(report), if_match=if_match, track=False)
        review_rules.record_decision(s, stored, review, actor)
        if audit_in is not None:
            audit_in(s, stored)
        enqueue_report_reviewed(s, stored, upstreams)
    log.info("report %s reviewed: %s", report_id, review.action)
    return stored


class ReportWriter(ConsumerWorker):
    """Consumes result events and writes DiagnosticReports (write_report marks them processed)."""

    name = REPORT_WRITER
    topics = (TOPIC_IMAGING_COMPLETED, TOPIC_CLINICAL_COMPLETED)
    upstreams: tuple[str, ...] = ()  # set by the runtime from MEDBRIDGE_UPSTREAM_FHIR_URL

    async def handle(self, event: MedBridgeEvent) -> None:
        await asyncio.to_thread(write_report, self.store, event, self.upstreams)
        self.notify_outbox()
