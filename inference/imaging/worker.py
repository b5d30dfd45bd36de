"""The imaging worker: StudyReceived in, ImagingInferenceCompleted out.

A thin adapter around :class:`inference.imaging.operator.LesionDetector`: it reads the study's
stored instances, runs the detector off the event loop, saves each heatmap overlay as a PNG
(atomically) and writes the result event to the outbox in the same transaction that records the
StudyReceived event as processed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pydicom

from inference.imaging.operator import LesionDetector
from inference.imaging.pixels import NotAnImageError, PixelDecodeError
from integration.datadir import private_folder
from integration.db.store import Store
from integration.events.broker import ConsumerOptions, ConsumerWorker
from integration.phi import folder_name, uid_hash
from schemas.events import (
    IMAGING_WORKER,
    TOPIC_IMAGING_COMPLETED,
    TOPIC_STUDY_RECEIVED,
    ImagingInferenceCompleted,
    InstanceFinding,
    MedBridgeEvent,
    StudyReceived,
)

log = logging.getLogger(__name__)


def _write_png(path: Path, data: bytes) -> None:
    private_folder(path.parent)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def infer_study(
    store: Store, detector: LesionDetector, artifacts_dir: Path, event: StudyReceived
) -> ImagingInferenceCompleted | None:
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
            result = detector.run_dataset(ds)
        except (NotAnImageError, PixelDecodeError) as exc:
            log.warning("instance %s not analysed: %s", uid_hash(inst.sop_instance_uid), type(exc).__name__)
            skipped.append(inst.sop_instance_uid)
            continue
        png = artifacts_dir / "heatmaps" / folder_name(event.study_instance_uid) / f"{inst.sop_instance_uid}.png"
        _write_png(png, result.overlay_png)
        findings.append(
            InstanceFinding(
                sop_instance_uid=inst.sop_instance_uid,
                series_instance_uid=inst.series_instance_uid,
                probabilities=result.probabilities,
                heatmap_path=str(png),
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
    topics = (TOPIC_STUDY_RECEIVED,)

    def __init__(
        self, store: Store, weights: Path, artifacts_dir: Path, *, device: str, options: ConsumerOptions
    ) -> None:
        super().__init__(store, options)
        self.weights = weights
        self.device = device
        self.artifacts_dir = artifacts_dir
        self.detector: LesionDetector | None = None

    async def load(self) -> None:
        self.detector = await asyncio.to_thread(LesionDetector, self.weights, self.device)

    async def handle(self, event: MedBridgeEvent) -> None:
        if not isinstance(event, StudyReceived):
            return
        assert self.detector is not None
        result = await asyncio.to_thread(infer_study, self.store, self.detector, self.artifacts_dir, event)
        self.finish(event.event_id, result, TOPIC_IMAGING_COMPLETED, key=event.study_instance_uid)
