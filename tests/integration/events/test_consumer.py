"""Consumers by type against the real embedded Kafka-protocol broker: typed dispatch, the ack
policy (retry, dead letter, undeclared types) and "processed" recorded with the handler's work."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.errors import PermanentEventError
from integration.events.consumer import ConsumerOptions, ConsumerWorker, Outcome, Publish, handles
from integration.events.relay import OutboxRelay
from schemas.events import (
    TOPIC_DEAD_LETTER,
    TOPIC_RECORD_RECEIVED,
    TOPIC_REPORT_ISSUED,
    TOPIC_STUDY_RECEIVED,
    RecordReceived,
    ReportIssued,
    StudyReceived,
)
from tests.integration.events.helpers import outbox, queue_events, until


def options(kafka: str, *, relay: OutboxRelay | None = None, producer: AIOKafkaProducer | None = None,
            max_attempts: int = 3) -> ConsumerOptions:
    return ConsumerOptions(
        bootstrap=kafka, group_prefix="test", max_attempts=max_attempts,
        notify_outbox=relay.wake if relay else lambda: None,
        dead_letter_producer=(lambda: producer) if producer else None,
    )


class RecordWorker(ConsumerWorker):
    """Handles RecordReceived only; ``fail(event, attempt)`` may name an error to raise."""

    name = "test"

    def __init__(self, store: Store, opts: ConsumerOptions,
                 fail: Callable[[RecordReceived, int], Exception | None] = lambda _e, _n: None) -> None:
        super().__init__(store, opts)
        self.fail = fail
        self.attempts: Counter[str] = Counter()
        self.seen: list[str] = []

    @handles(RecordReceived)
    async def on_record(self, event: RecordReceived) -> None:
        self.attempts[event.event_id] += 1
        error = self.fail(event, self.attempts[event.event_id])
        if error is not None:
            raise error
        self.seen.append(event.event_id)


class Announcements(ConsumerWorker):
    """Handles two types, each on its own handler; each answers with a ReportIssued naming its input."""

    name = "announcements"

    def __init__(self, store: Store, opts: ConsumerOptions) -> None:
        super().__init__(store, opts)
        self.studies: list[StudyReceived] = []
        self.records: list[RecordReceived] = []

    @handles(StudyReceived)
    async def on_study(self, event: StudyReceived) -> Outcome:
        self.studies.append(event)
        return Publish(ReportIssued(report_id=f"study:{event.study_instance_uid}", source_event_id=event.event_id,
                                    patient_ref=None), key=event.study_instance_uid)

    @handles(RecordReceived)
    async def on_record(self, event: RecordReceived) -> Outcome:
        self.records.append(event)
        return Publish(ReportIssued(report_id=f"record:{event.patient_ref}", source_event_id=event.event_id,
                                    patient_ref=event.patient_ref), key=event.patient_ref)


class _Refused:
    """An outcome that stores a row, then fails: nothing of the attempt may stay."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def write(self, s: Session) -> None:
        Store.add_to_outbox(s, TOPIC_REPORT_ISSUED, ReportIssued(report_id="half", source_event_id="x",
                                                                 patient_ref=None), key=None)
        s.flush()  # the row is in the transaction when the failure comes
        raise self.error


class RefusingWorker(ConsumerWorker):
    name = "refusing"

    @handles(RecordReceived)
    async def on_record(self, event: RecordReceived) -> Outcome:
        return _Refused(PermanentEventError("the report cannot be valid FHIR"))


async def _send(producer: AIOKafkaProducer, topic: str, *events: StudyReceived | RecordReceived | ReportIssued) -> None:
    """The events on ``topic`` in this order (one key: one partition, so they are consumed in order too)."""
    for event in events:
        await producer.send_and_wait(topic, event.model_dump_json().encode(), key=b"one-partition")


# declaring handlers ------------------------------------------------------------------------------
def test_a_worker_subscribes_to_the_topics_of_the_types_it_handles() -> None:
    assert Announcements.topics == (TOPIC_STUDY_RECEIVED, TOPIC_RECORD_RECEIVED)
    assert Announcements.handled == {StudyReceived: "on_study", RecordReceived: "on_record"}
    assert RecordWorker.topics == (TOPIC_RECORD_RECEIVED,)


def test_a_type_declared_twice_in_one_worker_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(TypeError, match=r"handles RecordReceived twice \(first and second\): keep one handler"):
        class Twice(ConsumerWorker):  # noqa: F841 - defining it is the test
            name = "twice"

            @handles(RecordReceived)
            async def first(self, event: RecordReceived) -> None: ...

            @handles(RecordReceived)
            async def second(self, event: RecordReceived) -> None: ...


def test_a_handler_must_be_async() -> None:
    with pytest.raises(TypeError, match=r"must be `async def`"):
        handles(RecordReceived)(lambda self, event: None)  # type: ignore[type-var]


# dispatch and "processed" ------------------------------------------------------------------------
async def test_each_type_reaches_its_handler_and_an_undeclared_type_is_dead_lettered(
    kafka: str, sqlite_store: Store
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    study = StudyReceived(study_instance_uid="1.2.3", revision=1, instance_count=1)
    record = RecordReceived(patient_ref="Patient/p1", revision=1)
    # a ReportIssued where RecordReceived travels: the worker subscribes to the topic, not to the type
    stray = ReportIssued(report_id="r-1", source_event_id="e-0", patient_ref=None)
    worker = Announcements(sqlite_store, options(kafka, producer=producer))
    await worker.start()
    try:
        await _send(producer, TOPIC_STUDY_RECEIVED, study)
        await _send(producer, TOPIC_RECORD_RECEIVED, stray, record)
        await until(lambda: sqlite_store.is_processed(worker.name, record.event_id)
                    and sqlite_store.is_processed(worker.name, study.event_id)
                    and len(sqlite_store.dead_letters()) == 1)
    finally:
        await worker.stop()
        await producer.stop()
    # each handler got its own type, typed
    assert [e.event_id for e in worker.studies] == [study.event_id]
    assert [e.event_id for e in worker.records] == [record.event_id]
    assert {e.report_id for e in map(_issued, outbox(sqlite_store, TOPIC_REPORT_ISSUED))} == {
        "study:1.2.3", "record:Patient/p1"}
    # the undeclared type: handled by no one, dead-lettered with what to do, and not marked processed
    (letter,) = sqlite_store.dead_letters()
    assert (letter.consumer, letter.topic, letter.event_id) == ("announcements", TOPIC_RECORD_RECEIVED,
                                                                stray.event_id)
    assert letter.error.startswith("announcements has no handler for ReportIssued "
                                   "(it handles RecordReceived, StudyReceived)")
    assert "then replay the event" in letter.error
    assert not sqlite_store.is_processed(worker.name, stray.event_id)


async def test_a_redelivered_event_is_a_no_op(kafka: str, sqlite_store: Store) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    study = StudyReceived(study_instance_uid="1.2.3", revision=1, instance_count=1)
    later = StudyReceived(study_instance_uid="1.2.4", revision=1, instance_count=1)
    worker = Announcements(sqlite_store, options(kafka))
    await worker.start()
    try:
        # at least once: the same event twice (a producer retry, a relay republish), then another
        await _send(producer, TOPIC_STUDY_RECEIVED, study, study, later)
        await until(lambda: sqlite_store.is_processed(worker.name, later.event_id))
    finally:
        await worker.stop()
        await producer.stop()
    assert [e.event_id for e in worker.studies] == [study.event_id, later.event_id]
    assert [_issued(row).source_event_id for row in outbox(sqlite_store, TOPIC_REPORT_ISSUED)] == [
        study.event_id, later.event_id]


async def test_a_failed_write_keeps_neither_the_work_nor_the_processed_mark(kafka: str, sqlite_store: Store) -> None:
    (event,) = queue_events(sqlite_store, 1)
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    worker = RefusingWorker(sqlite_store, options(kafka, relay=relay))
    await worker.start()
    try:
        await until(lambda: len(sqlite_store.dead_letters()) == 1)
    finally:
        await worker.stop()
        await relay.stop()
    (letter,) = sqlite_store.dead_letters()
    assert letter.error == "PermanentEventError: the report cannot be valid FHIR"  # at once: not retried
    assert outbox(sqlite_store, TOPIC_REPORT_ISSUED) == []
    assert not sqlite_store.is_processed(worker.name, event.event_id)


def _issued(row: object) -> ReportIssued:
    return ReportIssued.model_validate_json(row.payload)  # type: ignore[attr-defined]


# the ack policy ----------------------------------------------------------------------------------
async def test_consumer_retries_then_succeeds_and_commits(kafka: str, sqlite_store: Store) -> None:
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    (event,) = queue_events(sqlite_store, 1)
    relay.wake()
    worker = RecordWorker(sqlite_store, options(kafka, relay=relay),
                          fail=lambda _e, attempt: RuntimeError("transient") if attempt == 1 else None)
    await worker.start()
    await until(lambda: sqlite_store.is_processed("test", event.event_id))
    await worker.stop()
    assert worker.attempts[event.event_id] == 2
    # committed: a new member of the same group does not see it again
    worker = RecordWorker(sqlite_store, options(kafka, relay=relay))
    await worker.start()
    (second,) = queue_events(sqlite_store, 1)
    relay.wake()
    await until(lambda: second.event_id in worker.seen)
    await worker.stop()
    await relay.stop()
    assert worker.seen == [second.event_id]


async def test_repeated_failure_goes_to_dead_letter_and_the_next_event_still_flows(
    kafka: str, sqlite_store: Store
) -> None:
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    poison, good = queue_events(sqlite_store, 2)
    worker = RecordWorker(
        sqlite_store, options(kafka, relay=relay, producer=producer),
        fail=lambda e, _n: ValueError("cannot handle this one") if e.event_id == poison.event_id else None,
    )
    # raw garbage on the topic is dead-lettered too
    await producer.send_and_wait(TOPIC_RECORD_RECEIVED, b"\x00not json", key=b"Patient/0")
    relay.wake()
    await worker.start()
    await until(lambda: good.event_id in worker.seen and len(sqlite_store.dead_letters()) == 2, timeout=40)
    await worker.stop()
    dlq = AIOKafkaConsumer(TOPIC_DEAD_LETTER, bootstrap_servers=kafka, group_id="dlq", auto_offset_reset="earliest")
    await dlq.start()
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 2 and time.monotonic() < deadline:
        for msgs in (await dlq.getmany(timeout_ms=500)).values():
            got.extend(msgs)
    await dlq.stop()
    await producer.stop()
    await relay.stop()
    letters = sqlite_store.dead_letters()
    assert {d.event_id for d in letters} == {poison.event_id, None}
    assert any("ValueError: cannot handle this one" in d.error for d in letters)
    assert worker.attempts[poison.event_id] == 3
    assert not sqlite_store.is_processed("test", poison.event_id)
    assert len(got) == 2 and all(dict(m.headers)["consumer"] == b"test" for m in got)


async def test_already_processed_events_are_skipped(kafka: str, sqlite_store: Store) -> None:
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    first, second = queue_events(sqlite_store, 2)
    with sqlite_store.session() as s:
        Store.mark_processed(s, "test", first.event_id)
    relay.wake()
    worker = RecordWorker(sqlite_store, options(kafka, relay=relay))
    await worker.start()
    await until(lambda: second.event_id in worker.seen)
    await worker.stop()
    await relay.stop()
    assert worker.seen == [second.event_id]
