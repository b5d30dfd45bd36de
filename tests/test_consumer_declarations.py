"""The workers' declared event types agree with the table the outbox relay redelivers by."""

from __future__ import annotations

from inference.clinical.worker import ClinicalWorker
from inference.imaging.worker import ImagingWorker
from integration.reports.writer import ReportWriter
from schemas.events import (
    CONSUMER_OF_TOPIC,
    ClinicalInferenceCompleted,
    ExplanationRequested,
    ImagingInferenceCompleted,
    RecordReceived,
    StudyReceived,
)


def test_each_worker_handles_its_types_and_is_the_consumer_the_relay_waits_for() -> None:
    assert set(ImagingWorker.handled) == {StudyReceived, ExplanationRequested}
    assert set(ClinicalWorker.handled) == {RecordReceived}
    assert set(ReportWriter.handled) == {ImagingInferenceCompleted, ClinicalInferenceCompleted}
    # an event on a topic is republished until CONSUMER_OF_TOPIC's consumer records it processed,
    # so that consumer must be the worker subscribed to the topic
    subscribed = {topic: worker.name for worker in (ImagingWorker, ClinicalWorker, ReportWriter)
                  for topic in worker.topics}
    assert subscribed == CONSUMER_OF_TOPIC
