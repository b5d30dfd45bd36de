"""One current clinical draft per patient: a newer draft supersedes the earlier preliminary ones.

When the report writer stores a clinical report for a patient's record revision N, in the same
transaction:

- each earlier (lower revision) report of the patient still ``preliminary`` becomes ``cancelled`` and
  names the new one in a ``superseded-by`` extension; the new one names each in a ``replaces`` extension.
- a signed report (``final`` or ``amended``) is never touched: it is the clinical record, and only a
  reviewer changes it. The new draft names the latest signed one in a ``follows-signed`` extension, so
  the reviewer sees there is a signed report it would add to.
- a draft that arrives after a newer revision's report (a redelivered or late result) is stored
  ``cancelled`` at once, superseded by the newest: a stale impression never becomes the current draft.

Why ``cancelled`` and not ``entered-in-error``: in FHIR R4 (DiagnosticReport.status, value set
diagnostic-report-status) ``entered-in-error`` means the report "has been withdrawn following a previous
final release. This electronic record should never have existed", which is a reviewer's rejection of a
wrong report (integration.reports.review uses it so). A superseded draft was correct for the record as
it stood and was never released; ``cancelled`` ("the report is unavailable because the measurement was
not started or not completed (also sometimes called 'aborted')") says it was abandoned before completion,
which is what happened: a newer draft took over before anyone signed it.

A reviewer's decision and a supersession of the same report take the same lock (``review:{id}``, as
integration.reports.writer.apply_review does) and re-read the status under it: if the sign-off commits
first the report stays final; if the supersession does, the sign-off is refused (412: a new version).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from integration.db.tables import AiResult, FhirResource
from integration.delivery.plan import Destinations, enqueue_issued
from integration.fhir.resources import store_resource, validate_resource
from integration.fhir.storage import serialize_conditional
from integration.phi import uid_hash

log = logging.getLogger(__name__)

# Extensions linking a superseded draft and its successor (DiagnosticReport has no replaces element in
# R4: ServiceRequest.replaces is the pattern they follow), each a valueReference to a DiagnosticReport
SUPERSEDED_BY_URL = "urn:medbridge:extension:superseded-by"
REPLACES_URL = "urn:medbridge:extension:replaces"
FOLLOWS_SIGNED_URL = "urn:medbridge:extension:follows-signed"
SUPERSEDED_STATUS = "cancelled"
_SIGNED = frozenset({"final", "amended"})


@dataclass(frozen=True)
class _Draft:
    report_id: str
    revision: int
    status: str | None


def _link(url: str, report_id: str) -> dict[str, Any]:
    return {"url": url, "valueReference": {"reference": f"DiagnosticReport/{report_id}"}}


def _with_link(report: dict[str, Any], url: str, report_id: str) -> dict[str, Any]:
    kept = [e for e in report.get("extension", []) if not (e.get("url") == url and e.get("valueReference", {})
                                                          .get("reference") == f"DiagnosticReport/{report_id}")]
    return {**report, "extension": [*kept, _link(url, report_id)]}


def _other_reports(s: Session, patient_ref: str, report_id: str) -> list[_Draft]:
    """The patient's other clinical reports with their record revision (0 for reports written before the
    revision was kept: older than any new one) and live status, oldest revision first."""
    rows = s.execute(
        select(AiResult.report_id, AiResult.details, FhirResource.status)
        .join(FhirResource, (FhirResource.resource_type == "DiagnosticReport")
              & (FhirResource.id == AiResult.report_id))
        .where(AiResult.kind == "clinical", AiResult.subject_ref == patient_ref, AiResult.report_id != report_id)
    ).all()
    drafts = [_Draft(rid, int((details or {}).get("revision") or 0), status) for rid, details, status in rows]
    return sorted(drafts, key=lambda d: d.revision)


def _cancel(s: Session, draft: _Draft, successor_id: str, destinations: Destinations) -> bool:
    """Mark ``draft`` cancelled and superseded by ``successor_id`` if it is still preliminary under the
    review lock; the EHRs that hold it get the change. Returns whether it was cancelled."""
    serialize_conditional(s, [f"review:{draft.report_id}"])
    row = s.get(FhirResource, ("DiagnosticReport", draft.report_id), with_for_update=True)
    ai = s.get(AiResult, draft.report_id)
    if row is None or ai is None or row.content.get("status") != "preliminary":
        return False  # signed (or rejected) meanwhile: the reviewer's decision stands
    cancelled = _with_link({**row.content, "status": SUPERSEDED_STATUS}, SUPERSEDED_BY_URL, successor_id)
    stored, _ = store_resource(s, validate_resource(cancelled), track=False)
    enqueue_issued(s, stored, ai.details or {}, ai, destinations)  # an EHR holding the draft is told
    return True


def supersede_earlier_drafts(s: Session, report: dict[str, Any], revision: int,
                             destinations: Destinations) -> dict[str, Any]:
    """The clinical ``report`` (of record revision ``revision``, not yet stored) as it must be stored, after
    cancelling the patient's earlier preliminary drafts in ``s`` (the rules in the module docstring)."""
    patient_ref = (report.get("subject") or {}).get("reference")
    if not patient_ref:
        return report
    # two writers of one patient's reports (a rebalance mid-message) take turns: each sees the other's
    serialize_conditional(s, [f"clinical-drafts:{patient_ref}"])
    others = _other_reports(s, patient_ref, report["id"])
    newer = [d for d in others if d.revision > revision]
    if newer:
        log.info("clinical report %s of %s is stale (revision %d < %d): stored cancelled",
                 report["id"], uid_hash(patient_ref), revision, newer[-1].revision)
        return _with_link({**report, "status": SUPERSEDED_STATUS}, SUPERSEDED_BY_URL, newer[-1].report_id)
    for draft in others:
        if draft.status == "preliminary" and _cancel(s, draft, report["id"], destinations):
            report = _with_link(report, REPLACES_URL, draft.report_id)
            log.info("clinical report %s superseded by %s", draft.report_id, report["id"])
    signed = [d for d in others if d.status in _SIGNED]
    if signed:
        report = _with_link(report, FOLLOWS_SIGNED_URL, signed[-1].report_id)
    return report
