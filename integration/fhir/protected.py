"""Resources that plain FHIR writes may not change: MedBridge's AI reports.

An AI DiagnosticReport is signed off, amended or rejected only through its review
(``POST /api/reports/{id}/review``), which checks the state machine and the version, records the
reviewer and writes a Provenance. A ``PUT``, ``DELETE`` or transaction entry through ``/fhir`` could
otherwise make it ``final`` or strip its AI label with no review at all, so they are refused here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from integration.db.tables import AiResult, FhirResource
from integration.errors import ProtectedResourceError
from integration.fhir.resources import AI_ASSERTED, MEDBRIDGE_IDENTIFIER_SYSTEM


def is_ai_report(content: dict[str, Any]) -> bool:
    """Whether a DiagnosticReport's content says MedBridge's AI wrote it (the AIAST label or its identifier)."""
    labels = (content.get("meta") or {}).get("security") or []
    if any(isinstance(c, dict) and c.get("code") == AI_ASSERTED["code"]
           and c.get("system") == AI_ASSERTED["system"] for c in labels):
        return True
    return any(isinstance(i, dict) and i.get("system") == MEDBRIDGE_IDENTIFIER_SYSTEM
               for i in content.get("identifier") or [])


def _refusal(report_id: str, where: str = "") -> ProtectedResourceError:
    return ProtectedResourceError(
        f"{where}DiagnosticReport/{report_id} is an AI report: it changes only through its review. "
        f"Send POST /api/reports/{report_id}/review with the decision and If-Match: W/\"<version>\" instead")


def refuse_plain_write(s: Session, resource_type: str, resource_id: str) -> None:
    """ProtectedResourceError (409) when ``resource_type/resource_id`` is a stored AI report."""
    if resource_type != "DiagnosticReport":
        return
    if s.get(AiResult, resource_id) is not None:
        raise _refusal(resource_id)
    row = s.get(FhirResource, (resource_type, resource_id))
    if row is not None and not row.deleted and is_ai_report(row.content):
        raise _refusal(resource_id)


def refuse_plain_writes(s: Session, targets: Iterable[tuple[int, str, str]]) -> None:
    """``refuse_plain_write`` for a Bundle's entries that update stored resources, as (entry index, type,
    id); one query for all of them. The refusal names the first entry."""
    wanted = [(i, rid) for i, rtype, rid in targets if rtype == "DiagnosticReport"]
    if not wanted:
        return
    ids = sorted({rid for _, rid in wanted})
    protected = set(s.scalars(select(AiResult.report_id).where(AiResult.report_id.in_(ids))))
    for row in s.scalars(select(FhirResource).where(FhirResource.resource_type == "DiagnosticReport",
                                                    FhirResource.id.in_(ids))):
        if not row.deleted and is_ai_report(row.content):
            protected.add(row.id)
    for index, rid in wanted:
        if rid in protected:
            raise _refusal(rid, f"Bundle.entry[{index}]: ")
