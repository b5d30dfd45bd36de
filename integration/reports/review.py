"""The review rules of an AI report: who may move it where, on which version, and what is recorded.

State machine (DiagnosticReport.status)::

    preliminary ──▶ final | amended | entered-in-error
    final       ──▶ amended | entered-in-error
    amended     ──▶ amended | entered-in-error
    entered-in-error: final (nothing leaves it; a rejected report is not revived, a new one is made)
    cancelled: final (a clinical draft a newer one superseded: integration.reports.supersession)

A decision names the version it was made on (``If-Match``): on another version it is refused (412), so
two reviewers cannot overwrite each other. A rejection needs a coded reason (schemas.api.RejectionReason).
Each decision, in one transaction with the report's new version: the reviewer becomes
``DiagnosticReport.resultsInterpreter``, a ``Provenance`` names the new version as its target and the
reviewer as its agent, and the ``reviews`` row records the authenticated subject and display name.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from integration.db.tables import Review, utcnow
from integration.errors import InvalidResourceError, ReviewRefusedError, VersionConflictError
from integration.fhir.resources import new_id, store_resource, validate_resource
from integration.identity import Actor
from schemas.api import ReviewRequest

TRANSITIONS: dict[str, frozenset[str]] = {
    "preliminary": frozenset({"final", "amended", "entered-in-error"}),
    "final": frozenset({"amended", "entered-in-error"}),
    "amended": frozenset({"amended", "entered-in-error"}),
    "entered-in-error": frozenset(),
}
# a draft a newer one superseded (integration.reports.supersession), which the writer, not a reviewer,
# puts there: nothing leaves it either (the newer draft is the one to review)
SUPERSEDED = "cancelled"

REASON_SYSTEM = "urn:medbridge:review-reason"
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_DOCUMENT_COMPLETION = "http://terminology.hl7.org/CodeSystem/v3-DocumentCompletion"
_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
# Provenance.activity per decision: a sign-off legally authenticates the report; an amendment updates
# it; a rejection nullifies it (v3-DataOperation NULLIFY: "the act is recorded in error")
ACTIVITIES: dict[str, dict[str, str]] = {
    "final": {"system": _DOCUMENT_COMPLETION, "code": "LA", "display": "legally authenticated"},
    "amended": {"system": _DATA_OPERATION, "code": "UPDATE", "display": "revise"},
    "entered-in-error": {"system": _DATA_OPERATION, "code": "NULLIFY", "display": "nullify"},
}
# the reviewer's part: an amendment's author wrote the new conclusion; otherwise they verified the report
_ROLES: dict[str, dict[str, str]] = {
    "final": {"system": _PARTICIPANT_TYPE, "code": "verifier", "display": "Verifier"},
    "amended": {"system": _PARTICIPANT_TYPE, "code": "author", "display": "Author"},
    "entered-in-error": {"system": _PARTICIPANT_TYPE, "code": "verifier", "display": "Verifier"},
}


def check_transition(current: str, action: str) -> None:
    """ReviewRefusedError (409) unless a report in status ``current`` may become ``action``."""
    allowed = TRANSITIONS.get(current, frozenset())
    if action in allowed:
        return
    if current == SUPERSEDED:
        raise ReviewRefusedError(
            "the report is cancelled: a newer draft for this patient superseded it (its superseded-by extension "
            "names it); review that one", current)
    if not allowed:
        raise ReviewRefusedError(
            f"the report is {current}: no review decision can change it (a rejected report stays rejected)",
            current)
    raise ReviewRefusedError(
        f"the report is {current}: it can become {' or '.join(sorted(allowed))}, not {action}", current)


def check_version(current: int, if_match: int) -> None:
    """VersionConflictError (412) unless the decision was made on the report's current version."""
    if current != if_match:
        raise VersionConflictError(
            f"the report is at version {current}, not {if_match}: someone reviewed it meanwhile. Read it again "
            f"(GET /api/reports/{{id}}), check their decision, and send yours with If-Match: W/\"{current}\"")


def check_request(review: ReviewRequest) -> None:
    """What the request model cannot say alone: an amendment carries the amended conclusion."""
    if review.action == "amended" and not (review.conclusion and review.conclusion.strip()):
        raise InvalidResourceError([("conclusion", "an amendment needs the amended conclusion")], 422)


def decided_report(report: dict[str, Any], review: ReviewRequest, actor: Actor, if_match: int) -> dict[str, Any]:
    """The report's next content after ``review`` by ``actor`` (not yet stored): the rules are checked
    against ``report`` (the current version, read under the review's lock)."""
    check_version(int(report["meta"]["versionId"]), if_match)
    check_transition(report["status"], review.action)
    decided = dict(report)
    decided["status"] = review.action
    if review.action == "amended":
        decided["conclusion"] = review.conclusion
    decided["resultsInterpreter"] = [actor.reference()]
    return decided


def provenance(stored: dict[str, Any], review: ReviewRequest, actor: Actor) -> dict[str, Any]:
    """The Provenance of a decision: target = the report version it made, agent = the reviewer, the
    version it was made on as the revised entity, the reason of a rejection."""
    version = int(stored["meta"]["versionId"])
    reference = f"DiagnosticReport/{stored['id']}"
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": new_id(),
        "target": [{"reference": f"{reference}/_history/{version}"}],
        "recorded": stored["meta"]["lastUpdated"],
        "activity": {"coding": [ACTIVITIES[review.action]]},
        "agent": [{"type": {"coding": [_ROLES[review.action]]}, "who": actor.reference()}],
        "entity": [{"role": "revision", "what": {"reference": f"{reference}/_history/{version - 1}"}}],
    }
    if review.reason is not None:
        prov["reason"] = [{"coding": [{"system": REASON_SYSTEM, "code": review.reason}],
                           **({"text": review.comment} if review.comment else {})}]
    return prov


def review_row(stored: dict[str, Any], review: ReviewRequest, actor: Actor) -> Review:
    """The ``reviews`` row of a decision: the authenticated subject and display name, never a typed name."""
    return Review(report_id=stored["id"], action=review.action, reviewer=actor.display[:200],
                  reviewer_sub=actor.sub[:256], reason=review.reason, comment=review.comment,
                  report_version=int(stored["meta"]["versionId"]),
                  conclusion=review.conclusion if review.action == "amended" else None, at=utcnow())


def record_decision(s: Session, stored: dict[str, Any], review: ReviewRequest, actor: Actor) -> Review:
    """Write the decision's ``reviews`` row and Provenance in ``s`` (the transaction of the report's new
    version); returns the row, flushed (its id names the review in the PACS delivery)."""
    row = review_row(stored, review, actor)
    s.add(row)
    store_resource(s, validate_resource(provenance(stored, review, actor)), track=False)
    s.flush()
    return row
