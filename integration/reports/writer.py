"""The report writer: AI results in, FHIR R4 DiagnosticReports out (status ``preliminary``).

Reports carry the AI-asserted security label (``AIAST``, HL7 AI Transparency on FHIR), the
source study or the Observations they used, the conclusion, ICD-10-CM conclusion codes where the
cited evidence supports one, and the heatmap overlay as ``presentedForm`` (read from the artifact
store by the id the result event names, so this writer needs no access to the imaging worker's
files). A reviewer's action later makes them ``final``, ``amended`` or ``entered-in-error``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from integration.app.settings import Settings
from integration.db.artifacts import get_artifact, stored_artifact_ids
from integration.db.store import Store
from integration.db.tables import AiResult, FhirResource, stable_id, utcnow
from integration.delivery.plan import NO_DESTINATIONS, Destinations, enqueue_issued, enqueue_reviewed
from integration.errors import InvalidResourceError, PermanentEventError, ResourceNotFoundError
from integration.events.consumer import ConsumerOptions, ConsumerWorker, handles
from integration.fhir.resources import (
    AI_ASSERTED,
    MEDBRIDGE_IDENTIFIER_SYSTEM,
    fhir_string,
    store_resource,
    validate_resource,
)
from integration.fhir.storage import serialize_conditional
from integration.identity import Actor
from integration.observability import metrics
from integration.reports import review as review_rules
from integration.reports.index import index_report
from integration.reports.segmentation import check_segs_stored, segment_observations, segmentation_lines
from integration.reports.supersession import supersede_earlier_drafts
from schemas.api import ReviewRequest
from schemas.clinical import (
    GROUNDING_SUMMARY_EXTENSION,
    SENTENCE_SUPPORT_EXTENSION,
    UNSUPPORTED_MARK,
    ImpressionGrounding,
)
from schemas.events import (
    REPORT_WRITER,
    TOPIC_REPORT_ISSUED,
    ClinicalInferenceCompleted,
    ImagingInferenceCompleted,
    InstanceFinding,
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


def ranked_findings(findings: Sequence[InstanceFinding]) -> list[InstanceFinding]:
    """The findings, highest probability first: the first one's heatmap is the report's presentedForm."""
    return sorted(findings, key=lambda f: max(f.probabilities.values(), default=0.0), reverse=True)


def imaging_report(
    event: ImagingInferenceCompleted, threshold: float = 0.5, heatmap_png: bytes | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DiagnosticReport for an imaging result, and the details kept beside it for the viewer.
    ``heatmap_png``: the overlay of the highest-ranked finding (``top_heatmap``), the presentedForm."""
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
    findings = ranked_findings(event.findings)
    lines = [f"{event.model_name} {event.model_version} (demonstration model, not for clinical use)."]
    if event.earlier_images:
        lines.append(f"The images received since this study's previous report; its {_images(event.earlier_images)} "
                     "received before are in the earlier report(s).")
    if not findings and not event.segmentations:
        lines.append("No image in this study could be analysed.")
    elif findings:
        for name in findings[0].probabilities:
            positives = [f for f in findings if f.probabilities.get(name, 0.0) >= threshold]
            top = max(f.probabilities.get(name, 0.0) for f in findings)
            label = name.replace("_", " ")
            if positives:
                found = f"suspected in {len(positives)} of {_images(len(findings))}"
                lines.append(f"{label}: {found} (highest probability {top:.2f}).")
            else:
                lines.append(f"{label}: not detected in {_images(len(findings))} (highest probability {top:.2f}).")
    lines.extend(segmentation_lines(event))
    if event.skipped_instances:
        lines.append(f"{event.skipped_instances} instance(s) could not be decoded and were not analysed.")
    report["conclusion"] = fhir_string(" ".join(lines))
    if heatmap_png is not None:
        report["presentedForm"] = [
            {
                "contentType": "image/png",
                "title": "Heatmap (Grad-CAM) over the image with the highest probability",
                "data": base64.b64encode(heatmap_png).decode(),
            }
        ]
    details = {
        "model_name": event.model_name,
        "model_version": event.model_version,
        "instances": [f.model_dump() for f in findings],
        "skipped_instances": event.skipped_instances,
    }
    if event.segmentations:  # what the PACS export sends the SEGs and the SR's volumes from
        details["segmentations"] = [f.model_dump(mode="json") for f in event.segmentations]
    return report, details


_HEATMAP_FIELDS = ("heatmap_artifact_id", "heatmap_layer_artifact_id")  # the overlay, and the layer alone


def without_unknown_heatmaps(store: Store, event: ImagingInferenceCompleted) -> ImagingInferenceCompleted:
    """The event with every heatmap artifact id (overlay or layer) the store does not hold removed (logged),
    so that the report and its stored details name only artifacts that can be served. The imaging worker
    commits its artifacts before its event; an unknown id comes from elsewhere (a crafted or foreign event)."""
    named = {getattr(f, name) for f in event.findings for name in _HEATMAP_FIELDS if getattr(f, name)}
    missing = named - stored_artifact_ids(store, named)
    if not missing:
        return event
    log.warning("event %s names %d heatmap artifact(s) the store does not hold; its report goes without them",
                event.event_id, len(missing))
    findings = [f.model_copy(update={name: None for name in _HEATMAP_FIELDS if getattr(f, name) in missing})
                for f in event.findings]
    return event.model_copy(update={"findings": findings})


def top_heatmap(store: Store, event: ImagingInferenceCompleted) -> bytes | None:
    """The PNG bytes of the highest-ranked finding's heatmap, from the artifact store; None without one."""
    ranked = ranked_findings(event.findings)
    if not ranked or ranked[0].heatmap_artifact_id is None:
        return None
    return get_artifact(store, ranked[0].heatmap_artifact_id).data


def grounding_extensions(grounding: ImpressionGrounding) -> list[dict[str, Any]]:
    """The grounding as DiagnosticReport extensions: one per impression sentence, then a summary."""
    out: list[dict[str, Any]] = []
    for sentence in grounding.sentences:
        parts: list[dict[str, Any]] = [
            {"url": "text", "valueString": fhir_string(sentence.text)},
            {"url": "supported", "valueBoolean": sentence.supported},
            *({"url": "cited", "valueInteger": n} for n in sentence.cited),
            {"url": "similarity", "valueDecimal": sentence.similarity},
            {"url": "overlap", "valueDecimal": sentence.overlap},
        ]
        if sentence.reason:
            parts.append({"url": "reason", "valueString": sentence.reason})
        out.append({"url": SENTENCE_SUPPORT_EXTENSION, "extension": parts})
    out.append({"url": GROUNDING_SUMMARY_EXTENSION, "extension": [
        {"url": "citationsKept", "valueInteger": grounding.citations_kept},
        {"url": "citationsRemoved", "valueInteger": grounding.citations_removed},
        {"url": "truncated", "valueBoolean": grounding.truncated},
    ]})
    return out


def marked_impression(event: ClinicalInferenceCompleted) -> str:
    """The impression as the report's conclusion: each unsupported sentence followed by a plain-text mark.
    A draft with no supported sentence was already replaced by a plain statement (the operator's)."""
    grounding = event.grounding
    if grounding is None or grounding.supported_count == 0:
        return event.impression.strip()
    return " ".join(s.text if s.supported else f"{s.text} ({UNSUPPORTED_MARK})" for s in grounding.sentences)


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
    conclusion = marked_impression(event)
    if event.grounding is not None:
        report["extension"] = grounding_extensions(event.grounding)
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
        "revision": event.revision,  # which draft of the patient's is newer (integration.reports.supersession)
    }
    return report, details


def _store_report(
    s: Session,
    report: dict[str, Any],
    details: dict[str, Any],
    kind: str,
    event: MedBridgeEvent,
    study_uid: str | None,
    destinations: Destinations,
    resources: Sequence[dict[str, Any]] = (),
) -> None:
    if isinstance(event, ClinicalInferenceCompleted):  # one current draft per patient
        report = supersede_earlier_drafts(s, report, event.revision, destinations)
    for resource in resources:  # the report's results, before the report that references them
        store_resource(s, validate_resource(resource), track=False)  # AI results: not a record change
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
    s.flush()
    index_report(s, report, row)  # the worklist's row, in the report's transaction
    issued = ReportIssued(report_id=report["id"], source_event_id=event.event_id, patient_ref=row.subject_ref)
    Store.add_to_outbox(s, TOPIC_REPORT_ISSUED, issued, key=report["id"])
    enqueue_issued(s, report, details, row, destinations)  # same transaction: no delivery can be lost


ResultEvent = ImagingInferenceCompleted | ClinicalInferenceCompleted


@dataclass(frozen=True)
class ReportRecord:
    """A result event's report, ready to store: the report writer's outcome (written in the
    transaction that marks the result event processed)."""

    report: dict[str, Any]
    details: dict[str, Any]
    kind: Literal["imaging", "clinical"]
    event: ResultEvent
    study_uid: str | None
    destinations: Destinations = NO_DESTINATIONS
    resources: tuple[dict[str, Any], ...] = ()  # written with the report: its result Observations

    @property
    def report_id(self) -> str:
        return str(self.report["id"])

    def write(self, s: Session) -> None:
        """Store the report with its ReportIssued event and the deliveries it owes (each EHR, each PACS
        export peer: integration.delivery.plan); a report that is not valid FHIR is a PermanentEventError
        (building it again gives the same report)."""
        try:
            _store_report(s, self.report, self.details, self.kind, self.event, self.study_uid, self.destinations,
                          self.resources)
        except InvalidResourceError as exc:
            raise PermanentEventError(f"generated report is not valid FHIR: {exc}") from exc
        log.info("report %s written (%s) for event %s", self.report_id, self.kind, self.event.event_id)


def imaging_record(store: Store, event: ImagingInferenceCompleted,
                   destinations: Destinations = NO_DESTINATIONS) -> ReportRecord:
    event = without_unknown_heatmaps(store, event)
    check_segs_stored(store, event)
    report, details = imaging_report(event, heatmap_png=top_heatmap(store, event))
    observations = segment_observations(report, event)
    if observations:
        report["result"] = [{"reference": f"Observation/{o['id']}"} for o in observations]
    return ReportRecord(report, details, "imaging", event, event.study_instance_uid, destinations,
                        resources=tuple(observations))


def clinical_record(store: Store, event: ClinicalInferenceCompleted,
                    destinations: Destinations = NO_DESTINATIONS) -> ReportRecord:
    report, details = clinical_report(event)
    return ReportRecord(report, details, "clinical", event, None, destinations)


_RECORD_OF: dict[type[ResultEvent], Callable[..., ReportRecord]] = {
    ImagingInferenceCompleted: imaging_record,
    ClinicalInferenceCompleted: clinical_record,
}


def write_report(store: Store, event: ResultEvent, destinations: Destinations = NO_DESTINATIONS) -> str:
    """Build, validate and store the report for one result event, in one transaction with the deliveries
    it owes ``destinations``, outside the consumer (which stores a :class:`ReportRecord` with its
    "processed" mark). Idempotent: the report id derives from the study (or patient) and revision, so a
    replay rewrites it."""
    record = _RECORD_OF[type(event)](store, event, destinations)
    with store.session() as s:
        record.write(s)
    return record.report_id


def apply_review(
    store: Store, report_id: str, review: ReviewRequest, actor: Actor, if_match: int,
    destinations: Destinations = NO_DESTINATIONS,
    audit_in: Callable[[Session, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Record ``actor``'s decision on the report at version ``if_match`` and move it to its new status (one
    new version), by the rules of integration.reports.review (409 refused transition, 412 stale version),
    with its Provenance, ``reviews`` row and (``audit_in(session, new version)``) AuditEvent, and queue its
    follow-ups: the status change for each EHR, a new SR and SC version for each PACS export peer
    (integration.delivery.plan). All in the same transaction."""
    review_rules.check_request(review)
    with store.session(durable=True) as s:  # the decision is acknowledged when this commits
        # reviews of one report take turns from the read to the commit: the second of two decisions on the
        # same version then reads the first's version and is refused, instead of overwriting it
        serialize_conditional(s, [f"review:{report_id}"])
        row = s.get(FhirResource, ("DiagnosticReport", report_id), with_for_update=True)
        ai = s.get(AiResult, report_id)
        if row is None or ai is None:
            raise ResourceNotFoundError("DiagnosticReport", report_id)
        report = review_rules.decided_report(row.content, review, actor, if_match)
        stored, _ = store_resource(s, validate_resource(report), if_match=if_match, track=False)
        recorded = review_rules.record_decision(s, stored, review, actor)
        if audit_in is not None:
            audit_in(s, stored)
        enqueue_reviewed(s, stored, recorded, ai, destinations)
    metrics.REVIEW_DECISIONS.labels(review.action).inc()  # counted once committed
    log.info("report %s reviewed: %s", report_id, review.action)
    return stored


class ReportWriter(ConsumerWorker):
    """Consumes result events and writes DiagnosticReports with their deliveries (each EHR, each PACS
    export peer)."""

    name = REPORT_WRITER

    def __init__(self, store: Store, settings: Settings, options: ConsumerOptions) -> None:
        super().__init__(store, options)
        self.destinations = Destinations.from_settings(settings)

    @handles(ImagingInferenceCompleted)
    async def on_imaging(self, event: ImagingInferenceCompleted) -> ReportRecord:
        return await asyncio.to_thread(imaging_record, self.store, event, self.destinations)  # reads artifacts

    @handles(ClinicalInferenceCompleted)
    async def on_clinical(self, event: ClinicalInferenceCompleted) -> ReportRecord:
        return clinical_record(self.store, event, self.destinations)
