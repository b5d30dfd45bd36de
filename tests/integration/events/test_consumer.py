"""Outbox relay and consumer semantics against the real embedded Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from integration.db.store import Store
from integration.events.broker import EventConsumer, OutboxRelay
from schemas.events import TOPIC_DEAD_LETTER, TOPIC_RECORD_RECEIVED, MedBridgeEvent, RecordReceived


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    s.start()
    yield s
    s.stop()


def queue_events(store: Store, n: int) -> list[RecordReceived]:
    events = [RecordReceived(patient_ref=f"Patient/{i}", revision=1) for i in range(n)]
    with store.session() as s:
        for e in events:
            Store.add_to_outbox(s, TOPIC_RECORD_RECEIVED, e, key=e.patient_ref)
    return events


async def until(predicate, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_relay_publishes_what_was_queued_before_it_started(kafka: str, sqlite_store: Store) -> None:
    events = queue_events(sqlite_store, 3)
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    consumer = AIOKafkaConsumer(TOPIC_RECORD_RECEIVED, bootstrap_servers=kafka, group_id="check",
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 3 and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(msgs)
    finally:
        await consumer.stop()
        await relay.stop()
    assert sorted(RecordReceived.model_validate_json(m.value).event_id for m in got) == sorted(
        e.event_id for e in events
    )
    assert dict(got[0].headers)["event_type"] == b"RecordReceived"
    assert sqlite_store.outbox_backlog() == 0


def make_consumer(kafka: str, store: Store, handler, name: str = "test", producer=None) -> EventConsumer:  # noqa: ANN001
    return EventConsumer(name=name, topics=(TOPIC_RECORD_RECEIVED,), group_id=f"group-{name}", bootstrap=kafka,
                         store=store, handler=handler, max_attempts=3,
                         dead_letter_producer=(lambda: producer) if producer else None)


async def test_consumer_retries_then_succeeds_and_commits(kafka: str, sqlite_store: Store) -> None:
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    attempts: dict[str, int] = {}

    async def flaky(event: MedBridgeEvent) -> None:
        attempts[event.event_id] = attempts.get(event.event_id, 0) + 1
        if attempts[event.event_id] == 1:
            raise RuntimeError("transient")
        with sqlite_store.session() as s:
            Store.mark_processed(s, "test", event.event_id)

    (event,) = queue_events(sqlite_store, 1)
    relay.wake()
    consumer = make_consumer(kafka, sqlite_store, flaky)
    await consumer.start()
    await until(lambda: sqlite_store.is_processed("test", event.event_id))
    await consumer.stop()
    assert attempts[event.event_id] == 2
    # committed: a new member of the same group does not see it again
    again: list[str] = []

    async def record(e: MedBridgeEvent) -> None:
        again.append(e.event_id)

    consumer = make_consumer(kafka, sqlite_store, record)
    await consumer.start()
    (second,) = queue_events(sqlite_store, 1)
    relay.wake()
    await until(lambda: second.event_id in again)
    await consumer.stop()
    await relay.stop()
    assert again == [second.event_id]


async def test_repeated_failure_goes_to_dead_letter_and_the_next_event_still_flows(
    kafka: str, sqlite_store: Store
) -> None:
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    poison, good = queue_events(sqlite_store, 2)
    done: list[str] = []

    async def handler(event: MedBridgeEvent) -> None:
        if event.event_id == poison.event_id:
            raise ValueError("cannot handle this one")
        done.append(event.event_id)

    # raw garbage on the topic is dead-lettered too
    await producer.send_and_wait(TOPIC_RECORD_RECEIVED, b"\x00not json", key=b"Patient/0")
    relay.wake()
    consumer = make_consumer(kafka, sqlite_store, handler, producer=producer)
    await consumer.start()
    await until(lambda: good.event_id in done and len(sqlite_store.dead_letters()) == 2, timeout=40)
    await consumer.stop()
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
    assert len(got) == 2 and all(dict(m.headers)["consumer"] == b"test" for m in got)


async def test_already_processed_events_are_skipped(kafka: str, sqlite_store: Store) -> None:
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    first, second = queue_events(sqlite_store, 2)
    with sqlite_store.session() as s:
        Store.mark_processed(s, "test", first.event_id)
    seen: list[str] = []

    async def handler(event: MedBridgeEvent) -> None:
        seen.append(event.event_id)

    relay.wake()
    consumer = make_consumer(kafka, sqlite_store, handler)
    await consumer.start()
    await until(lambda: second.event_id in seen)
    await consumer.stop()
    await relay.stop()
    assert seen == [second.event_id]


async def test_events_lost_by_a_restarted_broker_are_republished_until_processed(sqlite_store: Store) -> None:
    """The embedded broker forgets everything on restart: the store decides what is done."""
    from integration.events.broker import EmbeddedBroker, ensure_topics
    from tests.conftest import free_port

    port = free_port()
    broker = EmbeddedBroker(port)
    broker.start()
    await ensure_topics(broker.bootstrap_servers)
    relay = OutboxRelay(sqlite_store, broker.bootstrap_servers, poll_seconds=0.1,
                        consumers_by_topic={TOPIC_RECORD_RECEIVED: "test"}, redeliver_after_seconds=1.0)
    await relay.start()
    (event,) = queue_events(sqlite_store, 1)
    relay.wake()
    await until(lambda: sqlite_store.outbox_backlog() == 0)
    broker.stop()  # published, never consumed, and now gone with the broker
    broker = EmbeddedBroker(port)
    broker.start()
    seen: list[str] = []

    async def handler(e: MedBridgeEvent) -> None:
        seen.append(e.event_id)
        with sqlite_store.session() as s:
            Store.mark_processed(s, "test", e.event_id)

    try:
        await ensure_topics(broker.bootstrap_servers)
        consumer = make_consumer(broker.bootstrap_servers, sqlite_store, handler)
        await consumer.start()
        await until(lambda: event.event_id in seen, timeout=60)
        await consumer.stop()
        await relay.stop()
    finally:
        broker.stop()
    assert seen == [event.event_id]
    assert sqlite_store.requeue_unprocessed({TOPIC_RECORD_RECEIVED: "test"}, 0) == 0
