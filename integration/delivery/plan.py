"""What each report change sends where: the delivery jobs a new report or a review adds.

Called inside the report writer's and the review's own transaction, so a report and everything it
owes downstream commit together: nothing depends on an event the broker may lose.

- An issued report: one ``ehr`` job per upstream EHR (the FHIR transaction), and, for an imaging
  report that analysed at least one image or holds a segmentation, one ``pacs`` job per export peer
  (the SR, SC and SEGs).
- A review: one ``ehr`` job per upstream (the status change) and, for the same imaging reports, one
  ``pacs`` job per export peer (a new SR and SC version that says final, amended or entered in error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from integration.app.settings import Settings
from integration.db.tables import AiResult, Review
from integration.delivery import queue
from integration.delivery.ehr.payload import report_transaction, review_update


@dataclass(frozen=True)
class Destinations:
    """Where results go: upstream FHIR base URLs and the AE titles of the export peers."""

    ehr: tuple[str, ...] = ()
    pacs: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Destinations:
        return cls(ehr=settings.upstream_urls, pacs=tuple(p.ae_title for p in settings.dicom_peers if p.export))


NO_DESTINATIONS = Destinations()  # nothing configured downstream (tests, demo runs)


def _shows_on_a_pacs(ai: AiResult | None) -> bool:
    # a result without an analysed image or a segmentation (a SEG) has nothing to show the PACS
    details = (ai.details or {}) if ai is not None else {}
    return (ai is not None and ai.kind == "imaging"
            and bool(details.get("instances") or details.get("segmentations")))


def enqueue_issued(s: Session, report: dict[str, Any], details: dict[str, Any], ai: AiResult,
                   destinations: Destinations) -> None:
    """Queue the deliveries of a newly written report. A report rewritten before it was sent (a
    redelivered result) refreshes its queued EHR transaction instead of adding a delivery; one rewritten
    after its create was sent gets an update (``rewritten``) when what the EHR would hold changed."""
    for upstream in destinations.ehr:
        bundle = report_transaction(s, report, details)
        existing = queue.issued_job(s, "ehr", upstream, report["id"])
        if existing is None:
            queue.enqueue(s, "ehr", upstream, report["id"], "issued", bundle)
        elif existing.state != "sent":
            existing.payload = bundle
        elif _changed_since_queued(s, upstream, report["id"], bundle["entry"][0]["resource"]):
            queue.enqueue(s, "ehr", upstream, report["id"], "rewritten", review_update(s, report))
    if not _shows_on_a_pacs(ai):
        return
    for ae_title in destinations.pacs:
        if queue.issued_job(s, "pacs", ae_title, report["id"]) is None:
            queue.enqueue(s, "pacs", ae_title, report["id"], "issued")


# what a rewrite may change without the EHR's copy changing: the time it was written, and the references
# to the Observations (urn:uuid in a transaction, the EHR's ids in an update)
_UNSENT = ("issued", "result")


def _changed_since_queued(s: Session, upstream: str, report_id: str, body: dict[str, Any]) -> bool:
    """Whether ``body`` (the report as the EHR would hold it) differs from the last one queued for it."""
    last = queue.last_job(s, "ehr", upstream, report_id)
    if last is None:
        return True
    queued = last.payload["report"] if "report" in last.payload else last.payload["entry"][0]["resource"]
    return ({k: v for k, v in body.items() if k not in _UNSENT}
            != {k: v for k, v in queued.items() if k not in _UNSENT})


def enqueue_reviewed(s: Session, report: dict[str, Any], review: Review, ai: AiResult,
                     destinations: Destinations) -> None:
    """Queue the follow-ups of a reviewer's action; ``review`` is flushed (it has its id)."""
    for upstream in destinations.ehr:
        queue.enqueue(s, "ehr", upstream, report["id"], "reviewed", review_update(s, report),
                      review_id=review.id, review_action=review.action)
    if not _shows_on_a_pacs(ai):
        return
    for ae_title in destinations.pacs:
        queue.enqueue(s, "pacs", ae_title, report["id"], "reviewed", review_id=review.id,
                      review_action=review.action)
