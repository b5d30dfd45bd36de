"""The imaging worker: StudyReceived in, ImagingInferenceCompleted out.

A thin adapter around :class:`inference.imaging.operator.LesionDetector`: it reads the study's
stored instances, runs the detector off the event loop, stores each heatmap overlay PNG and the heatmap
layer alone (grey, at the image's geometry, for a viewer to colour and blend over its own window) in the
artifact store (the database, so the report writer needs no access to this host's files) and hands the
result event, which names the overlays by artifact id, back to the consumer base, which writes it to the
outbox in the transaction that records the StudyReceived event as processed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pydicom

from inference.imaging.operator import LesionDetector
from inference.imaging.pixels import NotAnImageError, PixelDecodeError
from integration.app.settings import Settings
from integration.db.artifacts import put_artifact
from integration.db.store import Store
from integration.events.consumer import ConsumerOptions, ConsumerWorker, Outcome, Publish, handles
from integration.observability import metrics
from integration.phi import uid_hash
from schemas.events import (
    IMAGING_WORKER,
    ImagingInferenceCompleted,
    InstanceFinding,
    StudyReceived,
)

log = logging.getLogger(__name__)


def store_overlay(store: Store, png: bytes) -> str:
    """Store one overlay (or heatmap layer) PNG in the artifact store; its artifact id.

    Each in its own transaction, as soon as it is made, so a study of hundreds of images is not held in
    memory. Committed before the result event (``ConsumerWorker.finish``): an event never names an
    artifact the store lacks. A crash in between leaves rows no event names, which the redelivery,
    inferring the same images again, finds in place or stores anew (content-addressed)."""
    with store.session() as s:
        return put_artifact(s, png, "image/png")


def infer_study(store: Store, detector: LesionDetector, event: StudyReceived) -> ImagingInferenceCompleted | None:
    """Run the detector on the image instances this revision of the study brought; None when it
    brought none. Images an earlier revision brought have that revision's result already."""
    images = [i for i in store.study_instances(event.study_instance_uid) if i.is_image]
    # None: an instance stored before announcements recorded their revision, inferred as before
    instances = [i for i in images if i.announced_revision in (event.revision, None)]
    if not instances:
        log.info("study %s revision %d brought no image instance; nothing to infer",
                 uid_hash(event.study_instance_uid), event.revision)
        return None
    findings: list[InstanceFinding] = []
    skipped: list[str] = []
    for inst in instances:
        try:
            ds = pydicom.dcmread(inst.path)
            began = time.perf_counter()
            result = detector.run_dataset(ds)
            metrics.observe_inference(detector.model_name, time.perf_counter() - began, 1)  # one image a call
        except (NotAnImageError, PixelDecodeError) as exc:
            log.warning("instance %s not analysed: %s", uid_hash(inst.sop_instance_uid), type(exc).__name__)
            skipped.append(inst.sop_instance_uid)
            continue
        findings.append(
            InstanceFinding(
                sop_instance_uid=inst.sop_instance_uid,
                series_instance_uid=inst.series_instance_uid,
                probabilities=result.probabilities,
                heatmap_artifact_id=store_overlay(store, result.overlay_png),
                heatmap_layer_artifact_id=store_overlay(store, result.heatmap_layer_png),
            )
        )
    return ImagingInferenceCompleted(
        source_event_id=event.event_id,
        study_instance_uid=event.study_instance_uid,
        revision=event.revision,
        patient_ref=event.patient_ref,
        imaging_study_ref=event.imaging_study_ref,
        model_name=detector.model_name,
        model_version=detector.model_version,
        findings=findings,
        skipped_instances=len(skipped),
        skipped_sop_instance_uids=skipped,
        earlier_images=sum(i.announced_revision is not None and i.announced_revision < event.revision for i in images),
    )


class ImagingWorker(ConsumerWorker):
    name = IMAGING_WORKER

    def __init__(self, store: Store, settings: Settings, options: ConsumerOptions) -> None:
        super().__init__(store, options)
        self.weights = settings.imaging_model_path
        self.device = settings.device
        self.detector: LesionDetector | None = None

    async def load(self) -> None:
        self.detector = await asyncio.to_thread(LesionDetector, self.weights, self.device)

    @handles(StudyReceived)
    async def on_study(self, event: StudyReceived) -> Outcome | None:
        assert self.detector is not None, "load() runs before the first event"
        result = await asyncio.to_thread(infer_study, self.store, self.detector, event)
        return Publish(result, key=event.study_instance_uid) if result is not None else None
