"""The reviewer's worklist (GET /api/worklist) and claims (POST/DELETE /api/reports/{id}/claim).

One entry per study: the study's newest report stands for it (``worklist_entries.latest``), carrying the
study's highest probability and listing every report of the study. Filters and sorts read indexed columns
of ``worklist_entries`` joined to the report's live status, so a page of 5,000 reports is one query
plus one for the counts (see bench/worklist.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from integration.app.auditing import RequestAudit, audited
from integration.app.identity import ActorDep
from integration.app.services import Services, get_services
from integration.audit import events as audit_events
from integration.db.tables import FhirResource, ReviewClaim, WorklistEntry, utcnow
from integration.errors import ResourceNotFoundError
from integration.fhir.resources import allowed_codes, is_fhir_id
from integration.identity import Actor
from integration.reports.index import PRIORITY_NAMES, index_missing
from integration.reports.supersession import SUPERSEDED_STATUS
from schemas.worklist import Claim, StudyReport, WorklistItem, WorklistPage, WorklistSort

router = APIRouter(prefix="/api")
ServicesDep = Annotated[Services, Depends(get_services)]
_REPORT_STATUSES = allowed_codes("DiagnosticReport", "status")


@dataclass(frozen=True)
class WorklistFilters:
    """What the worklist is narrowed to; None: not narrowed."""

    status: tuple[str, ...] = ()
    kind: str | None = None
    modality: str | None = None
    model: str | None = None
    finding: str | None = None
    min_probability: float | None = None
    patient: str | None = None
    issued_from: datetime | None = None
    issued_to: datetime | None = None

    def conditions(self, with_status: bool = True) -> list[Any]:
        e = WorklistEntry
        # one entry per study: its newest report, never a superseded draft. Asked for by their status, the
        # superseded drafts are entries of their own, so a reviewer finds them (and the counts count them)
        standing: ColumnElement[bool] = e.latest.is_(True)
        if SUPERSEDED_STATUS in self.status:
            standing = or_(standing, FhirResource.status == SUPERSEDED_STATUS)
        out: list[Any] = [standing]
        if with_status and self.status:
            out.append(FhirResource.status.in_(self.status))
        if self.kind:
            out.append(e.kind == self.kind)
        if self.modality:
            out.append(e.modality == self.modality.upper())
        if self.model:
            out.append(e.model_name == self.model)
        if self.finding:
            out.append(e.top_finding == self.finding)
        if self.min_probability is not None:
            out.append(e.top_probability >= self.min_probability)
        if self.patient:
            ref = self.patient if "/" in self.patient else f"Patient/{self.patient}"
            out.append(or_(e.patient_ref == ref, e.patient_id == self.patient))
        if self.issued_from:
            out.append(e.issued_at >= self.issued_from)
        if self.issued_to:
            out.append(e.issued_at < self.issued_to)
        return out


_ORDER = {
    "probability": (WorklistEntry.top_probability.desc().nulls_last(), WorklistEntry.issued_at),
    "priority": (WorklistEntry.priority, WorklistEntry.issued_at),
    "waiting": (WorklistEntry.issued_at,),
}


_Query = TypeVar("_Query", bound=Select)  # type: ignore[type-arg]  # any row shape


def _joined(query: _Query) -> _Query:
    return query.select_from(WorklistEntry).join(FhirResource, and_(FhirResource.resource_type == "DiagnosticReport",
                                                                    FhirResource.id == WorklistEntry.report_id))


def _claims(s: Session, report_ids: list[str], now: datetime) -> dict[str, ReviewClaim]:
    if not report_ids:
        return {}
    rows = s.scalars(select(ReviewClaim).where(ReviewClaim.report_id.in_(report_ids),
                                               ReviewClaim.expires_at > now)).all()
    return {c.report_id: c for c in rows}


def _claim(c: ReviewClaim, actor: Actor) -> Claim:
    return Claim(report_id=c.report_id, reviewer=c.reviewer, reviewer_sub=c.reviewer_sub,
                 mine=c.reviewer_sub == actor.sub, until=_aware(c.expires_at))


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def worklist_page(s: Session, filters: WorklistFilters, sort: WorklistSort, offset: int, limit: int,
                  actor: Actor) -> WorklistPage:
    """One page of the worklist with its total and the counts per status."""
    now = utcnow()
    rows = s.execute(_joined(select(WorklistEntry, FhirResource.status)).where(*filters.conditions())
                     .order_by(*_ORDER[sort], WorklistEntry.report_id).offset(offset).limit(limit)).all()
    counts: dict[str, int] = {
        str(status): int(n) for status, n in s.execute(
            _joined(select(FhirResource.status, func.count()))
            .where(*filters.conditions(with_status=False)).group_by(FhirResource.status)).all()}
    total = sum(n for status, n in counts.items() if not filters.status or status in filters.status)
    keys = [e.study_key for e, _ in rows]
    siblings: dict[str, list[StudyReport]] = {}
    if keys:
        for e, status in s.execute(_joined(select(WorklistEntry, FhirResource.status))
                                   .where(WorklistEntry.study_key.in_(keys))
                                   .order_by(WorklistEntry.issued_at, WorklistEntry.latest)).all():
            siblings.setdefault(e.study_key, []).append(
                StudyReport(id=e.report_id, status=status or "unknown", issued=_aware(e.issued_at)))
    claims = _claims(s, [e.report_id for e, _ in rows], now)
    items = [
        WorklistItem(
            report_id=e.report_id, kind=e.kind, status=status or "unknown",  # type: ignore[arg-type]  # imaging|clinical
            study_instance_uid=e.study_key if e.kind == "imaging" else None,
            subject=e.patient_ref, patient_id=e.patient_id, modality=e.modality, model_name=e.model_name,
            model_version=e.model_version, top_finding=e.top_finding, top_probability=e.top_probability,
            priority=PRIORITY_NAMES.get(e.priority), issued=_aware(e.issued_at),
            waiting_seconds=max(0.0, (now - _aware(e.issued_at)).total_seconds()), instances=e.instance_count,
            claim=_claim(claims[e.report_id], actor) if e.report_id in claims else None,
            reports=siblings.get(e.study_key, []))
        for e, status in rows
    ]
    return WorklistPage(items=items, total=total, counts=counts, offset=offset, limit=limit)


def _statuses(status: str | None) -> tuple[str, ...]:
    values = tuple(v.strip() for v in (status or "").split(",") if v.strip())
    unknown = [v for v in values if v not in _REPORT_STATUSES]
    if unknown:
        raise HTTPException(400, "status must be DiagnosticReport statuses separated by commas ("
                                 + ", ".join(sorted(_REPORT_STATUSES)) + f"); {len(unknown)} value(s) are not")
    return values


@router.get("/worklist", response_model=WorklistPage, tags=["review"])
def worklist(
    services: ServicesDep,
    actor: ActorDep,
    audit: Annotated[RequestAudit, audited(audit_events.FHIR_SEARCH)],
    status: Annotated[str | None, Query(description="comma-separated DiagnosticReport statuses")] = None,
    kind: Annotated[str | None, Query(pattern="^(imaging|clinical)$")] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    model: Annotated[str | None, Query(max_length=128, description="the model's name")] = None,
    finding: Annotated[str | None, Query(max_length=128, description="the study's top finding")] = None,
    min_probability: Annotated[float | None, Query(ge=0, le=1)] = None,
    patient: Annotated[str | None, Query(max_length=128, description="Patient/<id>, <id> or DICOM PatientID")] = None,
    issued_from: Annotated[datetime | None, Query(alias="from")] = None,
    issued_to: Annotated[datetime | None, Query(alias="to")] = None,
    sort: WorklistSort = "probability",
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> WorklistPage:
    """The reviewer's worklist, one entry per study, filtered, sorted (``probability`` highest first,
    ``priority`` stat first then longest waiting, ``waiting`` longest first) and paged by offset; with the
    total and the counts per status."""
    filters = WorklistFilters(_statuses(status), kind, modality, model, finding, min_probability, patient,
                              issued_from, issued_to)
    audit.add(audit_events.query_entity(f"status={status or ''}&sort={sort}&offset={offset}", "reviewer worklist"))
    index_missing(services.store)
    with services.store.read_session() as s:
        return worklist_page(s, filters, sort, offset, limit, actor)


def _known_report(services: Services, report_id: str) -> None:
    if not is_fhir_id(report_id) or services.store.get_ai_result(report_id) is None:
        raise ResourceNotFoundError("DiagnosticReport", report_id)


@router.post("/reports/{report_id}/claim", response_model=Claim, tags=["review"],
             responses={409: {"description": "another reviewer holds the report"}})
def claim_report(report_id: str, services: ServicesDep, actor: ActorDep) -> Claim:
    """Claim the report for ``review_claim_seconds`` (renewed by claiming again): others see it as in
    review by the caller. 409 while another reviewer's claim holds."""
    _known_report(services, report_id)
    now = utcnow()
    until = now + timedelta(seconds=services.settings.review_claim_seconds)
    try:
        with services.store.session() as s:
            held = s.get(ReviewClaim, report_id, with_for_update=True)
            if held is not None and _aware(held.expires_at) > now and held.reviewer_sub != actor.sub:
                raise HTTPException(409, f"in review by {held.reviewer} until "
                                         f"{_aware(held.expires_at):%H:%M:%S} UTC; pick another report, or wait")
            held = held or ReviewClaim(report_id=report_id)
            held.reviewer_sub, held.reviewer = actor.sub[:256], actor.display[:200]
            held.claimed_at, held.expires_at = now, until
            s.add(held)
            s.flush()
            return _claim(held, actor)
    except IntegrityError:  # claimed by another at the same instant
        raise HTTPException(409, "another reviewer claimed this report just now; pick another one") from None


@router.delete("/reports/{report_id}/claim", status_code=204, tags=["review"],
               responses={409: {"description": "another reviewer holds the report"}})
def release_report(report_id: str, services: ServicesDep, actor: ActorDep) -> None:
    """Release the caller's claim (nothing to do when none is held); 409 when another reviewer's holds."""
    _known_report(services, report_id)
    with services.store.session() as s:
        held = s.get(ReviewClaim, report_id, with_for_update=True)
        if held is None or _aware(held.expires_at) <= utcnow():
            return
        if held.reviewer_sub != actor.sub:
            raise HTTPException(409, f"in review by {held.reviewer}: only they can release it")
        s.delete(held)
