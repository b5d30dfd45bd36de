"""The quality loop: sign-off metrics (GET /api/quality) and the decisions fed back to the model's owners
(GET /api/feedback, JSON Lines).

Both read the ``reviews`` rows beside the worklist index (model, version, modality, issued time): a
decision's time to sign is from its report's ``issued`` to the report's first decision.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from integration.app.auditing import RequestAudit, audited
from integration.app.services import Services, get_services
from integration.audit import events as audit_events
from integration.db.tables import AiResult, FhirResourceVersion, Review, WorklistEntry
from integration.reports.index import index_missing
from schemas.worklist import QualityGroup, QualityRates, QualityReport

router = APIRouter(prefix="/api", tags=["review"])
ServicesDep = Annotated[Services, Depends(get_services)]
FEEDBACK_LIMIT = 10_000


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values``, linearly interpolated; None when there is none."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def rates(actions: Iterable[str]) -> QualityRates:
    counted = Counter(actions)
    n = sum(counted.values())

    def share(k: str) -> float | None:
        return round(counted[k] / n, 4) if n else None

    return QualityRates(decisions=n, approved=counted["final"], amended=counted["amended"],
                        rejected=counted["entered-in-error"], acceptance_rate=share("final"),
                        amendment_rate=share("amended"), rejection_rate=share("entered-in-error"))


def _grouped(pairs: list[tuple[str, str]]) -> list[QualityGroup]:
    keys = sorted({k for k, _ in pairs})
    return [QualityGroup(key=k, **rates(a for kk, a in pairs if kk == k).model_dump()) for k in keys]


def _decisions(s: Session, start: datetime | None, end: datetime | None) -> list[tuple[Review, WorklistEntry | None]]:
    query = select(Review, WorklistEntry).outerjoin(WorklistEntry, WorklistEntry.report_id == Review.report_id)
    if start:
        query = query.where(Review.at >= start)
    if end:
        query = query.where(Review.at < end)
    return [(r, e) for r, e in s.execute(query.order_by(Review.at, Review.id)).all()]


def _first_decisions(s: Session, report_ids: set[str]) -> dict[str, datetime]:
    """Each report's first decision (ever, not only in the range: a later amendment is not a sign-off)."""
    first: dict[str, datetime] = {}
    for rid, at in s.execute(select(Review.report_id, Review.at).where(Review.report_id.in_(report_ids))
                             .order_by(Review.at)).all():
        first.setdefault(rid, _aware(at))
    return first


def quality_report(s: Session, start: datetime | None, end: datetime | None) -> QualityReport:
    decisions = _decisions(s, start, end)
    first = _first_decisions(s, {r.report_id for r, _ in decisions}) if decisions else {}
    waits = [(_aware(r.at) - _aware(e.issued_at)).total_seconds() for r, e in decisions
             if e is not None and first.get(r.report_id) == _aware(r.at)]
    p50, p90 = percentile(waits, 0.5), percentile(waits, 0.9)
    return QualityReport.model_validate({
        "from": start, "to": end,
        "time_to_sign_p50_seconds": None if p50 is None else round(p50, 3),
        "time_to_sign_p90_seconds": None if p90 is None else round(p90, 3),
        "overall": rates(r.action for r, _ in decisions),
        "rejection_reasons": dict(Counter(r.reason or "unspecified" for r, _ in decisions
                                       if r.action == "entered-in-error")),
        "by_model": _grouped([(f"{(e.model_name if e else None) or 'unknown'} {(e.model_version if e else None) or ''}"
                            .strip(), r.action) for r, e in decisions]),
        "by_modality": _grouped([((e.modality or e.kind) if e else "unknown", r.action) for r, e in decisions]),
    })


@router.get("/quality", response_model=QualityReport, response_model_by_alias=True)
def quality(services: ServicesDep,
            start: Annotated[datetime | None, Query(alias="from", description="decisions made at or after")] = None,
            end: Annotated[datetime | None, Query(alias="to", description="decisions made before")] = None,
            ) -> QualityReport:
    """Time to sign (p50/p90, issued to first decision) and acceptance, amendment and rejection rates
    overall, by rejection reason, by model and version, by modality, for the decisions in [from, to)."""
    index_missing(services.store)
    with services.store.read_session() as s:
        return quality_report(s, start, end)


def _model_output(s: Session, report_id: str) -> str | None:
    """The conclusion the model wrote: the report's first version (before any reviewer touched it)."""
    first = s.get(FhirResourceVersion, ("DiagnosticReport", report_id, 1))
    return None if first is None else first.content.get("conclusion")


def feedback_lines(s: Session, since: datetime | None, limit: int) -> Iterator[str]:
    query = select(Review, WorklistEntry).outerjoin(WorklistEntry, WorklistEntry.report_id == Review.report_id)
    if since is not None:
        query = query.where(Review.at > since)
    for review, entry in s.execute(query.order_by(Review.at, Review.id).limit(limit)).all():
        ai = s.get(AiResult, review.report_id)
        output = _model_output(s, review.report_id)
        record: dict[str, Any] = {
            "review_id": review.id,
            "report_id": review.report_id,
            "at": _aware(review.at).isoformat(),
            "decision": review.action,
            "reason": review.reason,
            "comment": review.comment,
            "reviewer": review.reviewer,
            "model_name": entry.model_name if entry else None,
            "model_version": entry.model_version if entry else None,
            "modality": entry.modality if entry else None,
            "kind": entry.kind if entry else (ai.kind if ai else None),
            "model_output": {"conclusion": output, "top_finding": entry.top_finding if entry else None,
                             "top_probability": entry.top_probability if entry else None,
                             "instances": (ai.details or {}).get("instances", []) if ai else []},
            "reviewer_final_text": review.conclusion if review.action == "amended" else output,
        }
        yield json.dumps(record, separators=(",", ":"), default=str) + "\n"


@router.get("/feedback", responses={200: {"content": {"application/x-ndjson": {}}}})
def feedback(services: ServicesDep, audit: Annotated[RequestAudit, audited(audit_events.FHIR_SEARCH)],
             since: Annotated[datetime | None, Query(description="decisions made after this time")] = None,
             limit: Annotated[int, Query(ge=1, le=FEEDBACK_LIMIT)] = FEEDBACK_LIMIT) -> StreamingResponse:
    """Each decision since ``since`` (oldest first) as one JSON object per line: the decision, the model's
    output, the reviewer's final text, the reason, the model and version, the modality. Page on with the
    last line's ``at`` as the next ``since``."""
    # the export carries the reports' conclusions: who took it is on the trail
    audit.add(audit_events.query_entity(f"since={since.isoformat() if since else ''}", "review feedback export"))
    index_missing(services.store)
    with services.store.read_session() as s:
        lines = list(feedback_lines(s, since, limit))
    return StreamingResponse(iter(lines), media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="medbridge-feedback.jsonl"'})
