"""DICOM export of AI results to the PACS: the ``pacs`` delivery jobs, sent by C-STORE.

The report writer adds one ``pacs`` job per export peer (``MEDBRIDGE_DICOM_PEERS`` entries with
``export: true``) for every imaging report that analysed an image, in the report's own transaction;
a review adds one more per peer, which sends the new SR and SC version carrying the clinician's
decision (integration.delivery.plan). ``DicomExportSender`` builds the objects at send time from the
stored AI result (and review) and sends them; the queue gives backoff, leases, the dead list and
replay (integration.delivery.queue). Jobs hold no patient data: ids, AE titles, counts and errors
that name the destination and the DICOM status only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import func, select

from integration.app.settings import DicomPeer, Settings
from integration.db.artifacts import get_artifact
from integration.db.store import Store
from integration.db.tables import Review
from integration.delivery.pacs.export import (
    ExportBuildError,
    ExportObjects,
    ExportSendError,
    ReviewOutcome,
    build_export,
    send_datasets,
)
from integration.delivery.queue import ClaimedJob, RetryPolicy
from integration.delivery.sender import DeliveryError, DeliverySender
from integration.phi import uid_hash

log = logging.getLogger(__name__)


def export_peers(peers: list[DicomPeer]) -> list[DicomPeer]:
    """The peers that receive AI results; refuses (at start-up) one without a port."""
    chosen = [p for p in peers if p.export]
    for p in chosen:
        if not p.port:
            raise ValueError(
                f"MEDBRIDGE_DICOM_PEERS: peer {p.ae_title} has export=true but no port; set the port it listens on"
            )
    return chosen


@dataclass(frozen=True)
class ExportPolicy:
    calling_ae: str
    max_attempts: int = 8
    retry_for_seconds: float = 0.0
    backoff_seconds: float = 5.0
    max_backoff_seconds: float = 600.0
    timeout_seconds: float = 30.0
    poll_seconds: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportPolicy:
        return cls(calling_ae=settings.dicom_ae_title, max_attempts=settings.dicom_export_max_attempts,
                   backoff_seconds=settings.dicom_export_backoff_seconds,
                   max_backoff_seconds=settings.dicom_export_max_backoff_seconds,
                   timeout_seconds=settings.dicom_export_timeout_seconds,
                   retry_for_seconds=settings.dicom_export_retry_for_seconds)

    @property
    def retry(self) -> RetryPolicy:
        # the lease outlasts an association with its C-STOREs, each up to the timeout
        return RetryPolicy(self.max_attempts, self.backoff_seconds, self.max_backoff_seconds,
                           lease_seconds=self.timeout_seconds * 4 + 60, retry_for_seconds=self.retry_for_seconds)


def review_outcome(store: Store, report_id: str, review_id: int) -> ReviewOutcome:
    """The review a ``reviewed`` job carries, numbered among the report's reviews (1 for the first)."""
    with store.read_session() as s:
        review = s.get(Review, review_id)
        if review is None or review.report_id != report_id:
            raise ExportBuildError(f"review {review_id} of report {report_id} is not stored")
        number = s.scalar(select(func.count()).select_from(Review)
                          .where(Review.report_id == report_id, Review.id <= review_id))
    return ReviewOutcome(number=int(number or 1), action=review.action,  # type: ignore[arg-type]
                         reviewer=review.reviewer, at=review.at, comment=review.comment, conclusion=review.conclusion)


class DicomExportSender(DeliverySender):
    """Sends the ``pacs`` delivery jobs to the export peers by C-STORE; ``start()`` / ``stop()``."""

    kind = "pacs"
    name = "dicom-export"

    def __init__(self, store: Store, peers: list[DicomPeer], policy: ExportPolicy) -> None:
        super().__init__(store, policy.retry, policy.poll_seconds)
        self.peers = {p.ae_title: p for p in export_peers(peers)}
        self.export_policy = policy

    def replay_hint(self, job_id: int) -> str:
        return f"replay it with POST /api/dicom-exports/{job_id}/replay"

    async def deliver(self, job: ClaimedJob) -> str | None:
        return await asyncio.to_thread(self._send, job)

    def _send(self, job: ClaimedJob) -> str:
        peer = self.peers.get(job.destination)
        try:
            if peer is None or peer.port is None:
                raise ExportBuildError(
                    f"destination {job.destination} is no longer an export peer in MEDBRIDGE_DICOM_PEERS; "
                    "add it back and replay, or leave this export dead"
                )
            objects, study_uid = self._build(job)
            send_datasets(objects.datasets, host=peer.host, port=peer.port, called_ae=peer.ae_title,
                          calling_ae=self.export_policy.calling_ae, timeout=self.export_policy.timeout_seconds)
        except ExportBuildError as exc:
            raise DeliveryError(str(exc), permanent=True, brief=type(exc).__name__) from exc
        except ExportSendError as exc:
            raise DeliveryError(str(exc), permanent=False) from exc
        except OSError as exc:
            raise DeliveryError(f"{type(exc).__name__} talking to the peer", permanent=False) from exc
        log.info("report %s (%s) exported to %s (study %s, %d objects)", job.report_id, job.what,
                 job.destination, uid_hash(study_uid), len(objects.datasets))
        return str(objects.sr.SOPInstanceUID)

    def _build(self, job: ClaimedJob) -> tuple[ExportObjects, str]:
        ai = self.store.get_ai_result(job.report_id)
        if ai is None or not ai.study_instance_uid:
            raise ExportBuildError(f"report {job.report_id} has no imaging result to export")
        review = None
        if job.what == "reviewed":
            if job.review_id is None:
                raise ExportBuildError(f"delivery {job.id} names no review")
            review = review_outcome(self.store, job.report_id, job.review_id)
        objects = build_export(ai, self.store.study_instances(ai.study_instance_uid),
                               lambda artifact_id: get_artifact(self.store, artifact_id).data, review)
        return objects, ai.study_instance_uid
