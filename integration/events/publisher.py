"""Quiet-period publishers: turn changed studies and patient records into events.

A study is announced once no instance has arrived for ``quiet_seconds`` (or its association was
released); a patient's record likewise once no resource arrived for it. The event goes to the
outbox in the same transaction that marks the revision published, so nothing is announced twice
and nothing is lost if the process dies in between.

Trackers are announced oldest first, each in its own transaction: one whose announcement fails (data
FHIR cannot hold, say) is set aside with its reason in the dead-letter store (listed by
GET /api/dead-letters, replayable) and the others go on. The loop runs under supervision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import ChangeTracker
from integration.errors import StoreUnavailableError
from integration.events import dead_letters
from integration.events.supervision import Supervised
from integration.fhir.resources import imaging_study_for, patient_for_dicom, store_resource
from integration.observability import tracing
from integration.phi import uid_hash
from schemas.events import TOPIC_RECORD_RECEIVED, TOPIC_STUDY_RECEIVED, RecordReceived, StudyReceived

log = logging.getLogger(__name__)


class QuietPeriodPublisher:
    def __init__(
        self,
        store: Store,
        kind: str,
        quiet_seconds: float,
        announce: Callable[[Session, ChangeTracker], None],
        on_announced: Callable[[], None] | None = None,
        poll_seconds: float = 0.25,
        max_wait_seconds: float | None = None,
    ) -> None:
        self.store = store
        self.kind = kind
        self.quiet_seconds = quiet_seconds
        self.max_wait_seconds = max_wait_seconds
        self.announce = announce
        self.on_announced = on_announced
        self.poll_seconds = poll_seconds
        self.set_aside = 0  # trackers set aside since start
        self._supervised = Supervised(f"{kind} publisher", self._run)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._supervised.start()

    def wake(self) -> None:
        """Look for due trackers now (thread-safe: DICOM threads call it when an association ends)."""
        if self._loop and self._wake:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        await self._supervised.stop()

    def running(self) -> bool:
        return self._supervised.running()

    def publish_due(self) -> int:
        """Announce every due tracker, oldest first; returns how many were announced. A tracker whose
        announcement fails for itself is set aside (see the module docstring); a database outage stops
        the round (raised), and every tracker stays due."""
        announced = 0
        for tracker in self.store.due_trackers(self.kind, self.quiet_seconds, self.max_wait_seconds):
            try:
                with self.store.session() as s:
                    if not Store.claim_tracker(s, tracker):
                        continue  # it changed (or another process announced it); due again after its quiet period
                    # the trace of the C-STORE or FHIR request that made the change goes on into the outbox row
                    with tracing.span(f"announce {self.kind}", parent=tracker.traceparent,
                                      attributes={"medbridge.revision": tracker.revision}):
                        self.announce(s, tracker)
            except StoreUnavailableError:
                raise
            except Exception as exc:  # noqa: BLE001 - per-item isolation: this one is set aside, the rest go on
                self._set_aside(tracker, exc)
                continue
            announced += 1
        if announced and self.on_announced:
            self.on_announced()
        return announced

    def _set_aside(self, tracker: ChangeTracker, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: announcing {self.kind} failed: {exc}"
        if dead_letters.set_aside_tracker(self.store, self.kind, tracker.key, tracker.revision, reason):
            self.set_aside += 1
            log.error("%s %s revision %d set aside: its announcement failed (%s); see GET /api/dead-letters",
                      self.kind, uid_hash(tracker.key), tracker.revision, type(exc).__name__)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.to_thread(self.publish_due)
            except StoreUnavailableError:  # an outage, not a bug: one line (rate-limited), no traceback
                log.warning("%s publisher: the database is unavailable; retrying", self.kind)
            except Exception:  # noqa: BLE001 - keep publishing; the tracker stays due and is retried
                log.exception("%s publisher failed; retrying", self.kind)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
            self._wake.clear()


def announce_study(s: Session, tracker: ChangeTracker) -> None:
    """Create or refresh the ImagingStudy (and the Patient, when new) and queue StudyReceived."""
    study_uid = tracker.key
    Store.mark_announced(s, study_uid, tracker.revision)
    instances = Store.instances_in(s, study_uid)
    patient_ref = patient_for_dicom(s, instances)
    imaging_study = imaging_study_for(study_uid, instances, patient_ref)
    store_resource(s, imaging_study, track=False)
    event = StudyReceived(
        study_instance_uid=study_uid,
        revision=tracker.revision,
        patient_ref=patient_ref,
        imaging_study_ref=f"ImagingStudy/{imaging_study['id']}",
        instance_count=len(instances),
    )
    Store.add_to_outbox(s, TOPIC_STUDY_RECEIVED, event, key=study_uid)
    log.info("study %s revision %d announced (event %s)", uid_hash(study_uid), tracker.revision, event.event_id)


def announce_record(s: Session, tracker: ChangeTracker) -> None:
    event = RecordReceived(patient_ref=tracker.key, revision=tracker.revision)
    Store.add_to_outbox(s, TOPIC_RECORD_RECEIVED, event, key=tracker.key)
    log.info("record of %s revision %d announced (event %s)", uid_hash(tracker.key), tracker.revision, event.event_id)


