"""The outbox relay against the real embedded Kafka-protocol broker: the store decides what is done."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer

from integration.db.store import Store
from integration.events.consumer import ConsumerOptions, ConsumerWorker, handles
from integration.events.embedded import EmbeddedBroker
from integration.events.relay import OutboxRelay
from integration.events.topics import ensure_topics
from schemas.events import TOPIC_RECORD_RECEIVED, RecordReceived
from tests.conftest import free_port
from tests.integration.events.helpers import queue_events, until


class RecordSeer(ConsumerWorker):
    name = "test"

    def __init__(self, store: Store, options: ConsumerOptions) -> None:
        super().__init__(store, options)
        self.seen: list[str] = []

    @handles(RecordReceived)
    async def on_record(self, event: RecordReceived) -> None:
        self.seen.append(event.event_id)


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


async def test_events_lost_by_a_restarted_broker_are_republished_until_processed(sqlite_store: Store) -> None:
    """The embedded broker forgets everything on restart: the store decides what is done."""
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
    try:
        await ensure_topics(broker.bootstrap_servers)
        worker = RecordSeer(sqlite_store, ConsumerOptions(bootstrap=broker.bootstrap_servers, group_prefix="t",
                                                          max_attempts=3, notify_outbox=relay.wake))
        await worker.start()
        await until(lambda: event.event_id in worker.seen, timeout=60)
        await until(lambda: sqlite_store.is_processed("test", event.event_id))
        await worker.stop()
        await relay.stop()
    finally:
        broker.stop()
    assert worker.seen == [event.event_id]
    assert sqlite_store.requeue_unprocessed({TOPIC_RECORD_RECEIVED: "test"}, 0) == 0
