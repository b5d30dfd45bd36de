"""The query API under /api: what the viewer (and any other client) reads and the review action."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi import Path as PathParam
from sqlalchemy.orm import Session

from integration.app.auditing import RequestAudit, audited
from integration.app.services import Services, get_services
from integration.audit import events as audit_events
from integration.auth.web import CurrentPrincipal
from integration.db.artifacts import ArtifactNotFoundError, get_artifact
from integration.db.tables import AiResult, DeadLetter, DeliveryJob
from integration.delivery import queue
from integration.delivery.plan import Destinations
from integration.errors import InvalidResourceError, PreconditionRequiredError, ResourceNotFoundError
from integration.events import dead_letters as letters
from integration.fhir.resources import allowed_codes, is_fhir_id
from integration.fhir.storage import get_resource, search_resources
from integration.reports import explanations
from integration.reports.writer import apply_review
from schemas.api import (
    DeliveryRecord,
    DicomExportRecord,
    ExplanationStatus,
    InstanceResult,
    ReportDetail,
    ReportSummary,
    ReviewRecord,
    ReviewRequest,
)
from schemas.events import ARTIFACT_ID_PATTERN, EvidencePassage

router = APIRouter(prefix="/api", tags=["query"])
ServicesDep = Annotated[Services, Depends(get_services)]


def _summary(report: dict[str, Any], ai: AiResult) -> ReportSummary:
    top_name, top_p = None, None
    for inst in ai.details.get("instances", []):
        for name, p in inst["probabilities"].items():
            if top_p is None or p > top_p:
                top_name, top_p = name, p
    return ReportSummary(
        id=report["id"],
        kind=ai.kind,  # type: ignore[arg-type]
        status=report["status"],
        subject=(report.get("subject") or {}).get("reference"),
        issued=report.get("issued"),
        conclusion=report.get("conclusion"),
        study_instance_uid=ai.study_instance_uid,
        top_finding=top_name,
        top_probability=top_p,
    )


# the largest id the replay routes' Integer primary keys hold (32-bit on PostgreSQL)
_MAX_ROW_ID = 2**31 - 1
_REPORT_STATUSES = allowed_codes("DiagnosticReport", "status")


def _ai_result(services: Services, report_id: str) -> AiResult:
    """The AI result behind report ``report_id``; ResourceNotFoundError (404) when there is none. An id
    that is not a FHIR id is unknown without asking the database (PostgreSQL refuses NUL in text)."""
    ai = services.store.get_ai_result(report_id) if is_fhir_id(report_id) else None
    if ai is None:
        raise ResourceNotFoundError("DiagnosticReport", report_id)
    return ai


def _detail(services: Services, report_id: str) -> ReportDetail:
    ai = _ai_result(services, report_id)
    report = get_resource(services.store, "DiagnosticReport", report_id)
    summary = _summary(report, ai)
    return ReportDetail(
        **summary.model_dump(),
        model_name=ai.details.get("model_name"),
        model_version=ai.details.get("model_version"),
        instances=[
            InstanceResult(
                sop_instance_uid=i["sop_instance_uid"],
                probabilities=i["probabilities"],
                has_heatmap=bool(i.get("heatmap_artifact_id")),
                heatmap_artifact_id=i.get("heatmap_artifact_id"),
                heatmap_layer_artifact_id=i.get("heatmap_layer_artifact_id"),
                explainable=i.get("explainable"),
                explanation=((ai.details.get("explanations") or {}).get(i["sop_instance_uid"]) or {}).get("state"),
            )
            for i in ai.details.get("instances", [])
        ],
        evidence=[EvidencePassage(**e) for e in ai.details.get("evidence", [])],
        input_refs=[str(r) for r in ai.details.get("input_refs", [])],
        reviews=[
            ReviewRecord.model_validate(r, from_attributes=True)
            for r in services.store.reviews_for(report_id)
        ],
        fhir=report,
    )


@router.get("/reports", response_model=list[ReportSummary])
def list_reports(
    services: ServicesDep,
    audit: Annotated[RequestAudit, audited(audit_events.FHIR_SEARCH)],
    status: Annotated[str | None, Query(description="comma-separated DiagnosticReport statuses")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ReportSummary]:
    statuses = [v.strip() for v in status.split(",") if v.strip()] if status else []
    unknown = [v for v in statuses if v not in _REPORT_STATUSES]
    if unknown:
        raise HTTPException(400, f"status must be DiagnosticReport statuses separated by commas "
                                 f"({', '.join(sorted(_REPORT_STATUSES))}); {len(unknown)} value(s) are not")
    audit.add(audit_events.query_entity(f"status={status or ''}&limit={limit}", "AI report worklist"))
    rows, _ = search_resources(services.store, "DiagnosticReport", status=statuses or None, limit=limit)
    out = []
    for report in rows:
        ai = services.store.get_ai_result(report["id"])
        if ai is not None:  # only reports MedBridge wrote
            out.append(_summary(report, ai))
    return out


def _etag(detail: ReportDetail) -> str:
    """The report's version as an ETag, for the If-Match of a review."""
    return f'W/"{detail.fhir["meta"]["versionId"]}"'


@router.get("/reports/{report_id}", response_model=ReportDetail)
def get_report(report_id: str, services: ServicesDep, response: Response,
               audit: Annotated[RequestAudit, audited(audit_events.FHIR_READ)]) -> ReportDetail:
    """The report with what the AI saw and its reviews; the ETag header is the version to review."""
    audit.about(f"DiagnosticReport/{report_id}")
    detail = _detail(services, report_id)
    audit.about(f"DiagnosticReport/{report_id}/_history/{detail.fhir['meta']['versionId']}", detail.subject)
    response.headers["ETag"] = _etag(detail)
    return detail


@router.get("/reports/{report_id}/image.png", responses={200: {"content": {"image/png": {}}}})
def report_image(report_id: str, services: ServicesDep,
                 audit: Annotated[RequestAudit, audited(audit_events.DICOM_RETRIEVE)],
                 sop_instance_uid: str | None = None) -> Response:
    """The image with the AI heatmap blended over it (the highest-probability image by default)."""
    audit.about(f"DiagnosticReport/{report_id}")
    ai = _ai_result(services, report_id)
    if ai.study_instance_uid:
        audit.add(audit_events.study_entity(ai.study_instance_uid))
    instances = ai.details.get("instances", [])
    chosen = next(
        (i for i in instances if sop_instance_uid is None or i["sop_instance_uid"] == sop_instance_uid), None
    )
    if chosen is None or not chosen.get("heatmap_artifact_id"):
        raise HTTPException(404, "this report has no image")
    return _artifact_response(services, chosen["heatmap_artifact_id"])


def _artifact_response(services: Services, artifact_id: str) -> Response:
    try:
        artifact = get_artifact(services.store, artifact_id)
    except ArtifactNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    # content-addressed: the bytes behind an id never change. Private: the image is of a patient.
    headers = {"Cache-Control": "private, max-age=31536000, immutable", "ETag": f'"{artifact.id}"',
               "X-Content-Type-Options": "nosniff"}
    return Response(artifact.data, media_type=artifact.media_type, headers=headers)


@router.get("/artifacts/{artifact_id}", responses={200: {"content": {"image/png": {}}}})
def artifact_content(
    artifact_id: Annotated[str, PathParam(pattern=ARTIFACT_ID_PATTERN,
                                          description="sha256 of the bytes, 64 lowercase hex digits")],
    services: ServicesDep,
) -> Response:
    """A stored artifact (a heatmap overlay or layer), by the id a report's instances name, with its media type:
    404 when the store holds no artifact with that id, 422 when the id is not 64 lowercase hex digits."""
    return _artifact_response(services, artifact_id)


_ETAG = re.compile(r'(?:W/)?"?([0-9]{1,9})"?')


def review_version(if_match: str | None) -> int:
    """The report version a review was made on, from its If-Match header (``W/"3"``, as the FHIR API's
    ETags). Required: a decision that does not say which version it read could overwrite another's."""
    if not if_match:
        raise PreconditionRequiredError(
            'a review needs If-Match with the version you reviewed, e.g. If-Match: W/"1": take it from the '
            "ETag of GET /api/reports/{id} (or fhir.meta.versionId)")
    found = _ETAG.fullmatch(if_match.strip())
    if found is None:
        raise InvalidResourceError([("If-Match", 'If-Match must be an ETag like W/"3"')], 400)
    return int(found.group(1))


ReviewAudit = Annotated[RequestAudit, audited(audit_events.review_interaction("decision"))]


@router.post("/reports/{report_id}/review", response_model=ReportDetail,
             responses={409: {"description": "the report's status does not allow this decision"},
                        412: {"description": "the report changed since the If-Match version"},
                        428: {"description": "If-Match is missing"}})
def review_report(report_id: str, review: ReviewRequest, services: ServicesDep, response: Response,
                  audit: ReviewAudit, if_match: Annotated[str | None, Header()] = None) -> ReportDetail:
    """Sign off (final), amend or reject (entered-in-error, with a reason) an AI report, as the
    authenticated caller. Send ``If-Match`` with the version reviewed (the ETag of GET /api/reports/{id}):
    a stale one gets 412, a missing one 428, a decision the current status does not allow 409."""
    audit.record.interaction = audit_events.review_interaction(review.action)
    audit.about(f"DiagnosticReport/{report_id}")
    _ai_result(services, report_id)  # an id that cannot be stored is unknown before any write
    version = review_version(if_match)

    def audit_in(s: Session, stored: dict[str, Any]) -> None:
        audit.about(f"DiagnosticReport/{report_id}/_history/{stored['meta']['versionId']}",
                    (stored.get("subject") or {}).get("reference"))
        audit.within(s)

    apply_review(services.store, report_id, review, audit.actor, version,
                 Destinations.from_settings(services.settings), audit_in=audit_in)
    services.notify_outbox()  # also wakes the delivery senders
    detail = _detail(services, report_id)
    response.headers["ETag"] = _etag(detail)
    return detail


@router.get("/dead-letters")
def dead_letters(services: ServicesDep) -> list[dict[str, Any]]:
    """Events that failed repeatedly, for an administrator (payloads omitted: they may hold PHI; the error
    is its class only, since an exception's message may quote the event's patient data)."""
    return [_dead_letter_summary(d) for d in services.store.dead_letters()]


def _dead_letter_summary(d: DeadLetter) -> dict[str, Any]:
    return {"id": d.id, "consumer": d.consumer, "topic": d.topic, "event_id": d.event_id,
            "error": error_class(d.error), "at": d.at, "replayed_at": d.replayed_at, "replayed_by": d.replayed_by}


@router.post("/dead-letters/{letter_id}/replay",
             responses={404: {"description": "no such dead letter"},
                        409: {"description": "replayed already, or its event was processed meanwhile"}})
def replay_dead_letter(letter_id: int, services: ServicesDep, principal: CurrentPrincipal) -> dict[str, Any]:
    """Put a dead-lettered event back in the outbox once its cause is fixed (admin). The event keeps its
    id, so its consumer processes it exactly once: a second replay, or a replay of an event processed
    meanwhile, is answered 409 and changes nothing."""
    if not 1 <= letter_id <= _MAX_ROW_ID:
        raise HTTPException(404, f"dead letter {letter_id} is not known; list them with GET /api/dead-letters")
    try:
        letter = letters.replay(services.store, letter_id, principal.sub)
    except letters.DeadLetterNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except letters.ReplayRefusedError as exc:
        raise HTTPException(409, str(exc)) from exc
    services.notify_outbox()  # the relay sends it now
    return _dead_letter_summary(letter)


def error_class(error: str) -> str:
    """The kind of a stored error (``PermanentEventError: <message>`` → ``PermanentEventError``), without
    the message, which may quote patient data."""
    return error.split(":", 1)[0].strip()[:120]


# an upstream's refusal quotes its OperationOutcome text, which may quote the report's patient data
_UPSTREAM_TEXT = re.compile(r"(answered HTTP \d{3}): .*?(?=; fix the cause|$)", re.DOTALL)


def upstream_error(error: str | None) -> str | None:
    """A writeback's last error with the upstream's own explanation withheld (the status and MedBridge's
    hint what to do stay)."""
    if error is None:
        return None
    return _UPSTREAM_TEXT.sub(r"\1 (the upstream's text is withheld here: it may quote patient data)", error)


StateQuery = Annotated[
    Literal["pending", "sent", "dead"] | None, Query(description="pending, sent or dead; all when absent")
]


def _replay(services: Services, job_id: int, kind: queue.Kind | None, noun: str, listing: str) -> DeliveryJob:
    """Put dead job ``job_id`` (of ``kind``) back in the queue: 404 when unknown, 409 when not dead."""
    unknown = f"{noun} {job_id} is not known; list them with {listing}"
    if not 1 <= job_id <= _MAX_ROW_ID:  # no row has it; the database could not even compare it
        raise HTTPException(404, unknown)
    try:
        job = queue.replay(services.store, job_id, kind)
    except queue.JobNotFoundError as exc:
        raise HTTPException(404, unknown) from exc
    except queue.JobNotDeadError as exc:
        raise HTTPException(409, str(exc)) from exc
    services.notify_outbox()  # also wakes the delivery senders
    return job


@router.get("/deliveries", response_model=list[DeliveryRecord], tags=["delivery"])
def deliveries(
    services: ServicesDep,
    state: StateQuery = None,
    kind: Annotated[Literal["ehr", "pacs"] | None, Query(description="ehr or pacs; both when absent")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[DeliveryRecord]:
    """Every delivery of a result downstream (EHR writebacks and PACS exports), oldest first;
    ``state=dead`` lists those to replay (payloads omitted: they hold patient data)."""
    return [_delivery_record(j) for j in queue.list_jobs(services.store, kind, state, limit)]


@router.post("/deliveries/{job_id}/replay", response_model=DeliveryRecord, tags=["delivery"])
def replay_delivery(job_id: int, services: ServicesDep) -> DeliveryRecord:
    """Queue a dead delivery again, with a fresh attempt budget, once its cause is fixed."""
    return _delivery_record(_replay(services, job_id, None, "delivery", "GET /api/deliveries"))


def _delivery_record(job: DeliveryJob) -> DeliveryRecord:
    record = DeliveryRecord.model_validate(job, from_attributes=True)
    return record.model_copy(update={"last_error": upstream_error(job.last_error)})


def _export_record(job: DeliveryJob) -> DicomExportRecord:
    return DicomExportRecord(id=job.id, report_id=job.report_id, destination_ae=job.destination, what=job.what,
                             review_action=job.review_action, state=job.state, attempts=job.attempts,
                             last_error=upstream_error(job.last_error), next_attempt_at=job.next_attempt_at,
                             created_at=job.created_at, updated_at=job.updated_at, sent_at=job.sent_at)


@router.get("/dicom-exports", response_model=list[DicomExportRecord])
def dicom_exports(
    services: ServicesDep,
    state: Annotated[Literal["pending", "sent", "dead"] | None, Query(description="pending, sent or dead")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[DicomExportRecord]:
    """DICOM exports of AI results to the PACS (the ``pacs`` deliveries), newest first; ``state=dead``
    lists those to replay."""
    return [_export_record(j) for j in queue.list_jobs(services.store, "pacs", state, limit, newest_first=True)]


@router.post("/dicom-exports/{export_id}/replay", response_model=DicomExportRecord)
def replay_dicom_export(export_id: int, services: ServicesDep) -> DicomExportRecord:
    """Put a dead export back to pending with a fresh attempt budget (404 unknown, 409 not dead)."""
    return _export_record(_replay(services, export_id, "pacs", "DICOM export", "GET /api/dicom-exports"))


def _writeback_summary(job: DeliveryJob) -> dict[str, Any]:
    """A writeback as /api/writebacks has always shown it (``kind`` create or update; no payload)."""
    return {
        "id": job.id,
        "upstream": job.destination,
        "report_id": job.report_id,
        "kind": "create" if job.what == "issued" else "update",
        "review_action": job.review_action,
        "state": job.state,
        "attempts": job.attempts,
        "next_attempt_at": job.next_attempt_at,
        "last_error": upstream_error(job.last_error),
        "created_at": job.created_at,
        "sent_at": job.sent_at,
        "upstream_ref": job.delivered_as,
        # a 412 that met an EHR edit of a field MedBridge owns: which fields, and the EHR's version. Both versions'
        # content stays in the job's payload, not here: it is patient data, as the upstream's error text is
        "conflict": _conflict_summary((job.payload or {}).get("conflict")),
    }


def _conflict_summary(conflict: dict[str, Any] | None) -> dict[str, Any] | None:
    if not conflict:
        return None
    return {"fields": conflict.get("fields"), "upstream_version": conflict.get("upstream_version")}


@router.get("/writebacks", tags=["writeback"])
def writebacks(services: ServicesDep, state: StateQuery = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[dict[str, Any]]:
    """Writebacks to the upstream EHR (the ``ehr`` deliveries), oldest first (payloads and the upstream's error text
    omitted: they hold patient data)."""
    return [_writeback_summary(j) for j in queue.list_jobs(services.store, "ehr", state, limit)]


@router.post("/writebacks/{job_id}/replay", tags=["writeback"])
def replay_writeback(job_id: int, services: ServicesDep) -> dict[str, Any]:
    """Queue a dead writeback again (after fixing what made the upstream refuse it)."""
    return _writeback_summary(_replay(services, job_id, "ehr", "writeback", "GET /api/writebacks"))


# explanation maps on demand (integration.reports.explanations): the imaging worker renders them, never the API
ExplanationAudit = Annotated[RequestAudit, audited(audit_events.DICOM_RETRIEVE)]


def _explanation_audit(audit: RequestAudit, services: Services, report_id: str) -> None:
    audit.about(f"DiagnosticReport/{report_id}")
    ai = _ai_result(services, report_id)
    audit.about(f"DiagnosticReport/{report_id}", ai.subject_ref)
    if ai.study_instance_uid:
        audit.add(audit_events.study_entity(ai.study_instance_uid))


@router.post("/reports/{report_id}/images/{sop_instance_uid}/explanation", response_model=ExplanationStatus,
             status_code=202,
             responses={200: {"description": "ready already: the image has its explanation map"},
                        404: {"description": "no such report, or the report has no result for this image"},
                        409: {"description": "the model that scored the image renders no explanation map"}})
def ask_for_explanation(report_id: str, sop_instance_uid: str, services: ServicesDep, response: Response,
                        audit: ExplanationAudit) -> ExplanationStatus:
    """Ask for the explanation map (Grad-CAM heatmap) of one image of an imaging result that has none (the
    imaging worker renders them only for the top images of a study). Reviewer role. 202 while the worker
    renders it (poll GET on the same path), 200 once it is ready; asking again does not render it again."""
    _explanation_audit(audit, services, report_id)
    status, asked = explanations.request_explanation(services.store, report_id, sop_instance_uid)
    if asked:
        services.notify_outbox()  # the relay publishes it now, not at its next poll
    if status.state != explanations.PENDING:
        response.status_code = 200
    return status


@router.get("/reports/{report_id}/images/{sop_instance_uid}/explanation", response_model=ExplanationStatus,
            responses={404: {"description": "no such report or image, or nobody asked for its explanation map"}})
def explanation_status(report_id: str, sop_instance_uid: str, services: ServicesDep,
                       audit: Annotated[RequestAudit, audited(audit_events.FHIR_READ)]) -> ExplanationStatus:
    """Where the image's explanation map stands: pending, ready (with its artifact ids) or failed (with the
    reason; POST again to retry)."""
    _explanation_audit(audit, services, report_id)
    return explanations.explanation_state(services.store, report_id, sop_instance_uid)
