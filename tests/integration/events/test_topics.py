"""Every event published through the outbox has a redelivery owner (a consumer that must record it
processed) or is a notification nothing inside MedBridge depends on."""

from __future__ import annotations

from integration.reports.writer import ReportWriter
from schemas.events import CONSUMER_OF_TOPIC, NOTIFICATION_TOPICS, TOPIC_OF_EVENT, ReportIssued


def test_every_topic_of_an_event_is_owned_by_a_consumer_or_a_notification() -> None:
    topics = set(TOPIC_OF_EVENT.values())
    assert topics == set(CONSUMER_OF_TOPIC) | set(NOTIFICATION_TOPICS)
    assert not set(CONSUMER_OF_TOPIC) & set(NOTIFICATION_TOPICS)


def test_no_worker_consumes_report_issued() -> None:
    """ReportIssued is not redelivered: were a worker to depend on it, a broker loss would lose its work."""
    from inference.clinical.worker import ClinicalWorker
    from inference.imaging.worker import ImagingWorker

    for worker in (ReportWriter, ImagingWorker, ClinicalWorker):
        assert ReportIssued not in worker.handled, worker.__name__
        for topic in worker.topics:
            assert CONSUMER_OF_TOPIC[topic] == worker.name  # each topic it reads, it owns
