"""Explanation maps on demand: a reviewer asks for the heatmap of an image outside the top N, the imaging worker
renders it, and the result records it so every later view shows it.

Why the event path (``ExplanationRequested`` through the outbox) and not a request table the worker polls: the
imaging worker already consumes events with its models loaded, in its own process (or cluster member), and the
outbox gives what a polled table would have to rebuild: the request is committed with the row that says it is
pending, republished until the worker records it processed, dead-lettered if it keeps failing, and traced.
The API never loads a model.

Where the state lives: in the AI result's details (``explanations``: SOP Instance UID -> state), beside the
instances whose heatmap ids it fills in, so no new table is needed and the report detail (``GET
/api/reports/{id}``) shows the map as it shows the precomputed ones. Each change locks the result's row
(``FOR UPDATE`` on PostgreSQL; SQLite serialises writers), so two reviewers asking at once publish one event.

States: ``pending`` (asked, the worker has not answered), ``ready`` (the instance names its overlay and layer),
``failed`` (with a reason; asking again asks anew). An image that has a heatmap is ``ready`` without asking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import AiResult, DeadLetter, utcnow
from integration.errors import ExplanationUnavailableError, ResourceNotFoundError
from integration.phi import uid_hash
from schemas.api import ExplanationState, ExplanationStatus
from schemas.events import TOPIC_EXPLANATION_REQUESTED, ExplanationRequested

log = logging.getLogger(__name__)

PENDING, READY, FAILED = "pending", "ready", "failed"


def _instance(ai: AiResult, sop_instance_uid: str) -> dict[str, Any]:
    """The result's finding for the image; ResourceNotFoundError (404) when the result has none for it."""
    for instance in (ai.details or {}).get("instances", []):
        if instance.get("sop_instance_uid") == sop_instance_uid:
            return dict(instance)
    raise ResourceNotFoundError(f"DiagnosticReport/{ai.report_id}/images", sop_instance_uid)


def _dead_letter_error(s: Session, ai: AiResult, sop_instance_uid: str) -> str | None:
    """Why the pending request's event was dead-lettered (and not replayed), or None: a request whose event the
    worker kept failing on would otherwise stay pending for ever."""
    recorded = (ai.details.get("explanations") or {}).get(sop_instance_uid) or {}
    if recorded.get("state") != PENDING or not recorded.get("event_id"):
        return None
    return s.scalar(select(DeadLetter.error).where(DeadLetter.event_id == recorded["event_id"],
                                                   DeadLetter.replayed_at.is_(None)).limit(1))


def _status(ai: AiResult, instance: dict[str, Any], dead_letter: str | None = None) -> ExplanationStatus:
    sop = instance["sop_instance_uid"]
    if instance.get("heatmap_artifact_id"):
        recorded = (ai.details.get("explanations") or {}).get(sop) or {}
        return ExplanationStatus(report_id=ai.report_id, sop_instance_uid=sop, state="ready",
                                 heatmap_artifact_id=instance["heatmap_artifact_id"],
                                 heatmap_layer_artifact_id=instance.get("heatmap_layer_artifact_id"),
                                 reason=None, requested_at=recorded.get("requested_at"))
    recorded = (ai.details.get("explanations") or {}).get(sop)
    if recorded is None:
        raise ResourceNotFoundError(f"DiagnosticReport/{ai.report_id}/images/{sop}/explanation",
                                    "(nobody asked for it: POST to the same path asks)")
    state: ExplanationState = "failed" if recorded["state"] == FAILED or dead_letter else "pending"
    reason = f"the imaging worker could not render it: {dead_letter}" if dead_letter else recorded.get("reason")
    return ExplanationStatus(report_id=ai.report_id, sop_instance_uid=sop, state=state,
                             heatmap_artifact_id=None, heatmap_layer_artifact_id=None,
                             reason=reason, requested_at=recorded.get("requested_at"))


def _locked(s: Session, report_id: str) -> AiResult:
    ai = s.get(AiResult, report_id, with_for_update=True)
    if ai is None:
        raise ResourceNotFoundError("DiagnosticReport", report_id)
    return ai


def explanation_state(store: Store, report_id: str, sop_instance_uid: str) -> ExplanationStatus:
    """Where the explanation map of the image stands; ResourceNotFoundError (404) for an unknown report or
    image, or an image whose map nobody asked for and the worker did not render."""
    with store.session() as s:
        ai = s.get(AiResult, report_id)
        if ai is None:
            raise ResourceNotFoundError("DiagnosticReport", report_id)
        return _status(ai, _instance(ai, sop_instance_uid), _dead_letter_error(s, ai, sop_instance_uid))


def request_explanation(store: Store, report_id: str, sop_instance_uid: str) -> tuple[ExplanationStatus, bool]:
    """Ask for the image's explanation map; (its state, whether this call asked the worker). Idempotent: an
    image that has one is ready, one asked for is pending, and neither publishes anything; a failed one (or a
    pending one whose event was dead-lettered) is asked anew. ResourceNotFoundError (404) for an unknown report
    or image, ExplanationUnavailableError (409) when the model that scored it renders no explanation map."""
    with store.session(durable=True) as s:
        ai = _locked(s, report_id)
        instance = _instance(ai, sop_instance_uid)
        if instance.get("explainable") is False:
            raise ExplanationUnavailableError(
                f"the model that scored this image ({ai.details.get('model_name') or 'unknown'}) renders no "
                "explanation map (its bundle's metadata asks for none: medbridge.explain)")
        explanations = dict(ai.details.get("explanations") or {})
        current = explanations.get(sop_instance_uid) or {}
        dead_letter = _dead_letter_error(s, ai, sop_instance_uid)  # pending, but its event was dead-lettered
        if instance.get("heatmap_artifact_id") or (current.get("state") == PENDING and not dead_letter):
            return _status(ai, instance), False
        event = ExplanationRequested(report_id=report_id, study_instance_uid=ai.study_instance_uid or "",
                                     series_instance_uid=instance.get("series_instance_uid") or "",
                                     sop_instance_uid=sop_instance_uid)
        explanations[sop_instance_uid] = {"state": PENDING, "requested_at": utcnow().isoformat(),
                                          "event_id": event.event_id}
        ai.details = {**ai.details, "explanations": explanations}  # a new dict: JSON columns track assignment
        Store.add_to_outbox(s, TOPIC_EXPLANATION_REQUESTED, event, key=event.study_instance_uid or report_id)
        status = _status(ai, instance)
    log.info("explanation map of image %s of report %s asked for (event %s)", uid_hash(sop_instance_uid),
             report_id, event.event_id)
    return status, True


@dataclass(frozen=True)
class ExplanationRecord:
    """The imaging worker's answer to an ExplanationRequested: the rendered map's artifacts, or why there is
    none. An outcome (integration.events.consumer): written in the transaction that marks the event processed."""

    report_id: str
    sop_instance_uid: str
    heatmap_artifact_id: str | None = None
    heatmap_layer_artifact_id: str | None = None
    reason: str | None = None

    def write(self, s: Session) -> None:
        ai = s.get(AiResult, self.report_id, with_for_update=True)
        if ai is None:  # the report went away meanwhile: nothing to record against
            return
        explanations = dict(ai.details.get("explanations") or {})
        entry = dict(explanations.get(self.sop_instance_uid) or {})
        instances = list(ai.details.get("instances", []))
        if self.heatmap_artifact_id is not None:
            instances = [{**i, "heatmap_artifact_id": self.heatmap_artifact_id,
                          "heatmap_layer_artifact_id": self.heatmap_layer_artifact_id}
                         if i.get("sop_instance_uid") == self.sop_instance_uid else i for i in instances]
            entry.update(state=READY, reason=None, ready_at=utcnow().isoformat())
        else:
            entry.update(state=FAILED, reason=self.reason, failed_at=utcnow().isoformat())
        explanations[self.sop_instance_uid] = entry
        ai.details = {**ai.details, "instances": instances, "explanations": explanations}
