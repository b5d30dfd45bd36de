"""Nothing given up silently, nothing stuck behind one bad item: redelivery ends in a dead letter with
its reason (counted in /health and /metrics), a dead letter is replayed once and processed once, an
outbox row the broker refuses and a study whose announcement fails are set aside while the others go
on. Real broker, real HTTP, both engines where the store is involved."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import ChangeTracker, DicomInstance, OutboxEntry
from integration.events import dead_letters
from integration.events.consumer import ConsumerOptions, ConsumerWorker, handles
from integration.events.publisher import QuietPeriodPublisher, announce_study
from integration.events.relay import OutboxRelay
from integration.fhir.storage import get_resource
from schemas.events import TOPIC_RECORD_RECEIVED, TOPIC_STUDY_RECEIVED, RecordReceived, StudyReceived
from tests import authorized
from tests.conftest import serve_app, stack_settings
from tests.integration.events.helpers import outbox, queue_events, until


class Late(ConsumerWorker):
    """The consumer that was not running while its events were redelivered."""

    name = "late"

    def __init__(self, store: Store, options: ConsumerOptions) -> None:
        super().__init__(store, options)
        self.handled: list[str] = []

    @handles(RecordReceived)
    async def on_record(self, event: RecordReceived) -> None:
        self.handled.append(event.event_id)


async def test_redelivery_ends_in_a_dead_letter_that_is_replayed_once_and_processed_once(
    kafka: str, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    relay = OutboxRelay(store, kafka, poll_seconds=0.05, consumers_by_topic={TOPIC_RECORD_RECEIVED: "late"},
                        redeliver_after_seconds=0.1, max_publishes=2)
    await relay.start()
    try:
        with caplog.at_level(logging.ERROR, logger="integration.events.relay"):
            (event,) = queue_events(store, 1)
            relay.wake()
            await until(lambda: len(store.dead_letters()) == 1, timeout=30)
            await asyncio.sleep(0.5)  # more requeue rounds: still one letter, logged once
        (letter,) = store.dead_letters()
        assert (letter.consumer, letter.topic, letter.event_id) == ("late", TOPIC_RECORD_RECEIVED, event.event_id)
        assert letter.error.startswith("never processed after 2 deliveries")
        assert [r.getMessage() for r in caplog.records if "never processed" in r.getMessage()] == [
            f"outbox relay: 1 event(s) on {TOPIC_RECORD_RECEIVED} never processed after 2 deliveries; dead-lettered "
            "(see GET /api/dead-letters, replay with POST /api/dead-letters/{id}/replay)"]
        assert relay.dead_lettered == 1
        await relay.stop()
        # from here on a relay with the default redelivery period: the replayed event is published once and
        # waits for its consumer (the broker also still holds its two earlier deliveries)
        relay = OutboxRelay(store, kafka, poll_seconds=0.05, consumers_by_topic={TOPIC_RECORD_RECEIVED: "late"})
        await relay.start()

        with serve_app(stack_settings(tmp_path), store) as port:
            base = f"http://127.0.0.1:{port}"
            health = authorized.get(f"{base}/health")
            assert health.status_code == 200  # worth a look, not a failing check
            assert health.json()["details"]["dead_letters"] == {"total": 1, "by_topic": {TOPIC_RECORD_RECEIVED: 1}}
            metrics = authorized.get(f"{base}/metrics").text
            assert f'medbridge_dead_letters{{topic="{TOPIC_RECORD_RECEIVED}"}} 1' in metrics
            assert authorized.post(f"{base}/api/dead-letters/{letter.id}/replay",
                                   headers=authorized.headers("reviewer")).status_code == 403

            # two administrators replay it at the same moment: one replay
            async with authorized.AsyncClient(base_url=base) as client:
                answers = await asyncio.gather(*(client.post(f"/api/dead-letters/{letter.id}/replay")
                                                 for _ in range(2)))
            assert sorted(a.status_code for a in answers) == [200, 409]
            replayed = next(a.json() for a in answers if a.status_code == 200)
            assert replayed["replayed_by"] == "pytest" and replayed["replayed_at"]
            assert "replayed already" in next(a.json()["detail"] for a in answers if a.status_code == 409)

            worker = Late(store, ConsumerOptions(bootstrap=kafka, group_prefix="dl", max_attempts=3,
                                                 notify_outbox=relay.wake))
            await worker.start()
            try:
                await until(lambda: store.is_processed("late", event.event_id), timeout=60)
                await asyncio.sleep(0.5)  # redeliveries meanwhile are skipped
            finally:
                await worker.stop()
            assert worker.handled == [event.event_id]  # processed exactly once

            # a letter for an event processed meanwhile (e.g. a straggler's delivery) is not replayed
            store.record_dead_letter("late", TOPIC_RECORD_RECEIVED, event.event_id, "TimeoutError: x", b"{}")
            (_, second) = store.dead_letters()
            again = authorized.post(f"{base}/api/dead-letters/{second.id}/replay")
            assert again.status_code == 409 and "processed already" in again.json()["detail"]
            assert authorized.post(f"{base}/api/dead-letters/999999/replay").status_code == 404
            assert authorized.get(f"{base}/health").json()["details"]["dead_letters"]["total"] == 1
    finally:
        await relay.stop()


async def test_an_outbox_row_the_broker_refuses_is_set_aside_and_the_others_go_out(
    kafka: str, sqlite_store: Store
) -> None:
    first = queue_events(sqlite_store, 1)
    huge = RecordReceived(patient_ref="Patient/" + "x" * (9 << 20), revision=1)  # over the 8 MiB request cap
    with sqlite_store.session() as s:
        Store.add_to_outbox(s, TOPIC_RECORD_RECEIVED, huge, key=None)
    last = queue_events(sqlite_store, 1)
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.05)
    await relay.start()
    try:
        await until(lambda: sqlite_store.outbox_backlog() == 0, timeout=30)
    finally:
        await relay.stop()
    (letter,) = sqlite_store.dead_letters()
    assert (letter.consumer, letter.event_id) == (dead_letters.RELAY, huge.event_id)
    assert letter.error.startswith("MessageSizeTooLargeError")
    assert relay.dead_lettered == 1 and relay.running() is False
    rows = {r.event_id: r for r in outbox(sqlite_store, TOPIC_RECORD_RECEIVED)}
    assert rows[first[0].event_id].publish_count == rows[last[0].event_id].publish_count == 1


def _instance(s: Session, study: str, series: str, sop: str, at: float) -> None:
    s.add(DicomInstance(sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=series,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.7", transfer_syntax_uid="1.2.840.10008.1.2.1",
                        modality="OT", patient_id=None, is_image=True, path=f"{sop}.dcm", size=1))
    Store.touch(s, "study", study, at=at)


def test_a_study_whose_announcement_fails_is_set_aside_and_the_others_go_on(store: Store) -> None:
    with store.session() as s:
        _instance(s, "1.2.3", "1.2.3.1", "1.2.3.1.1", at=100.0)
        _instance(s, "1.2.4", "1.2.4.1", "1.2.4.1.1", at=50.0)  # the oldest
        _instance(s, "1.2.5", "1.2.3_abc", "1.2.5.1.1", at=200.0)  # a UID FHIR refuses as an id
    broken = {"1.2.3"}
    order: list[str] = []

    def announce(s: Session, tracker: ChangeTracker) -> None:
        order.append(tracker.key)
        if tracker.key in broken:
            raise RuntimeError("an announcement that cannot succeed")
        announce_study(s, tracker)

    publisher = QuietPeriodPublisher(store, "study", 0, announce)
    assert publisher.publish_due() == 2
    assert order == ["1.2.4", "1.2.3", "1.2.5"]  # oldest first; the failure did not stop the round
    assert publisher.publish_due() == 0  # set aside, not retried ahead of the others for ever
    (letter,) = store.dead_letters()
    assert (letter.consumer, letter.topic, letter.payload) == ("study-publisher", "tracker:study", "1.2.3")
    assert letter.error.startswith("RuntimeError: announcing study failed")

    # the study with the hostile series UID got its ImagingStudy and its StudyReceived
    announced = [StudyReceived.model_validate_json(r.payload) for r in outbox(store, TOPIC_STUDY_RECEIVED)]
    assert [e.study_instance_uid for e in announced] == ["1.2.4", "1.2.5"]
    hostile = get_resource(store, "ImagingStudy", announced[1].imaging_study_ref.split("/")[1])
    series_uid = hostile["series"][0]["uid"]
    assert series_uid.startswith("x-") and len(series_uid) <= 64

    # fixed and replayed: announced once
    broken.clear()
    dead_letters.replay(store, letter.id, "admin")
    assert publisher.publish_due() == 1
    assert [StudyReceived.model_validate_json(r.payload).study_instance_uid
            for r in outbox(store, TOPIC_STUDY_RECEIVED)] == ["1.2.4", "1.2.5", "1.2.3"]
    with pytest.raises(dead_letters.ReplayRefusedError, match="replayed already"):
        dead_letters.replay(store, letter.id, "admin")
    with store.session() as s:
        assert s.query(OutboxEntry).count() == 3
