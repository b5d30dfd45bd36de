"""The worklist index: one ``worklist_entries`` row per AI report, with what the worklist filters and
sorts on (modality, model, top finding and probability, the ordering ServiceRequest's priority), so a
page of thousands of reports is one indexed query instead of a scan of every report's JSON.

The report writer indexes each report in its own transaction; reports stored before the index existed
(or written by other paths) are indexed on the first worklist read (:func:`index_missing`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import AiResult, DicomInstance, FhirResource, WorklistEntry

# ServiceRequest.priority, most pressing first; 4: no ordering request known
PRIORITY_RANK = {"stat": 0, "asap": 1, "urgent": 2, "routine": 3}
PRIORITY_NAMES = {rank: name for name, rank in PRIORITY_RANK.items()}
NO_PRIORITY = 4
# objects that are not the study's images: their modality does not describe the study
_NOT_IMAGES = {"SR", "KO", "PR", "SEG", "DOC"}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return _EPOCH
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _issued(report: dict[str, Any], ai: AiResult) -> datetime:
    raw = report.get("issued")
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            pass
    created = ai.created_at
    if created is None:
        return datetime.now(UTC)
    return created if created.tzinfo else created.replace(tzinfo=UTC)


def top_of(details: dict[str, Any]) -> tuple[str | None, float | None]:
    """The finding with the highest probability over the result's images, and that probability."""
    name, best = None, None
    for inst in details.get("instances", []):
        for finding, p in inst.get("probabilities", {}).items():
            if best is None or p > best:
                name, best = finding, float(p)
    return name, best


def _priority(s: Session, report: dict[str, Any]) -> int:
    """The priority of the ServiceRequest the report's ImagingStudy was made for (basedOn), if any."""
    for study_ref in report.get("imagingStudy", []):
        ref = str(study_ref.get("reference", ""))
        if not ref.startswith("ImagingStudy/"):
            continue
        study = s.get(FhirResource, ("ImagingStudy", ref.split("/", 1)[1]))
        for based_on in (study.content.get("basedOn", []) if study is not None else []):
            target = str(based_on.get("reference", ""))
            if target.startswith("ServiceRequest/"):
                request = s.get(FhirResource, ("ServiceRequest", target.split("/", 1)[1]))
                if request is not None and not request.deleted:
                    return PRIORITY_RANK.get(str(request.content.get("priority", "")), NO_PRIORITY)
    return NO_PRIORITY


def _study_facts(s: Session, study_uid: str | None) -> tuple[str | None, str | None]:
    """The study's modality (of its images, not its SR or KO objects) and DICOM PatientID."""
    if not study_uid:
        return None, None
    rows = s.execute(select(DicomInstance.modality, DicomInstance.patient_id)
                     .where(DicomInstance.study_instance_uid == study_uid).limit(200)).all()
    modalities = [m for m, _ in rows if m and m not in _NOT_IMAGES] or [m for m, _ in rows if m]
    patient_ids = [p for _, p in rows if p]
    return (modalities[0] if modalities else None), (patient_ids[0] if patient_ids else None)


def index_report(s: Session, report: dict[str, Any], ai: AiResult) -> None:
    """Write (or rewrite) the worklist row of ``report`` in ``s`` and make the study's newest report its
    ``latest`` row, holding the study's aggregates."""
    details = ai.details or {}
    modality, patient_id = _study_facts(s, ai.study_instance_uid)
    finding, probability = top_of(details)
    row = s.get(WorklistEntry, report["id"]) or WorklistEntry(report_id=report["id"])
    row.study_key = (ai.study_instance_uid or ai.subject_ref or report["id"])[:128]
    row.kind = ai.kind
    row.issued_at = _issued(report, ai)
    row.modality = modality
    row.patient_ref = ai.subject_ref
    row.patient_id = patient_id
    row.model_name = details.get("model_name")
    row.model_version = details.get("model_version")
    row.top_finding, row.top_probability = finding, probability
    row.priority = _priority(s, report)
    row.instance_count = len(details.get("instances", []))
    s.add(row)
    s.flush()
    _promote_latest(s, row.study_key)


def _promote_latest(s: Session, study_key: str) -> None:
    """Mark the study's newest report ``latest`` and give it the study's highest probability and image
    count (the worklist shows one entry per study)."""
    rows = s.scalars(select(WorklistEntry).where(WorklistEntry.study_key == study_key)).all()
    own = [s.get(AiResult, r.report_id) for r in rows]
    # a superseded draft (integration.reports.supersession) never stands for the study, even when a late
    # redelivery stored it last
    superseded = set(s.scalars(select(FhirResource.id).where(
        FhirResource.resource_type == "DiagnosticReport", FhirResource.status == "cancelled",
        FhirResource.id.in_([r.report_id for r in rows]))))
    # issued has whole seconds: two revisions in one second are told apart by when their result was stored
    newest = max(zip(rows, own, strict=True),
                 key=lambda ra: (ra[0].report_id not in superseded, _aware(ra[0].issued_at),
                                 _aware(ra[1].created_at) if ra[1] else _EPOCH))[0]
    s.execute(update(WorklistEntry).where(WorklistEntry.study_key == study_key).values(latest=False))
    newest.latest = True
    best = max(((top_of(a.details or {}), a) for a in own if a is not None),
               key=lambda t: -1.0 if t[0][1] is None else t[0][1], default=None)
    if best is not None:
        newest.top_finding, newest.top_probability = best[0]
    newest.instance_count = sum(len((a.details or {}).get("instances", [])) for a in own if a is not None)
    newest.priority = min(r.priority for r in rows)


def index_missing(store: Store, limit: int = 2000) -> int:
    """Index the AI reports that have no worklist row yet (written before the index, or by a path that
    does not index); returns how many. Cheap when there is none: one anti-join."""
    try:
        with store.session() as s:
            missing = s.scalars(
                select(AiResult).outerjoin(WorklistEntry, WorklistEntry.report_id == AiResult.report_id)
                .where(WorklistEntry.report_id.is_(None)).order_by(AiResult.created_at).limit(limit)).all()
            for ai in missing:
                report = s.get(FhirResource, ("DiagnosticReport", ai.report_id))
                if report is not None:
                    index_report(s, report.content, ai)
            return len(missing)
    except IntegrityError:  # another request indexed them at the same time: theirs stands
        return 0
