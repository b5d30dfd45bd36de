"""A consumer handling several events at once (the clinical worker with an LLM server): bounded, events
of one key in offset order, every event processed once and the offsets committed (real broker)."""

from __future__ import annotations

import asyncio
from collections import Counter

from integration.db.store import Store
from integration.events.consumer import ConsumerOptions, ConsumerWorker, handles
from integration.events.relay import OutboxRelay
from schemas.events import TOPIC_RECORD_RECEIVED, RecordReceived
from tests.integration.events.helpers import until


class SlowWorker(ConsumerWorker):
    """Each event takes 0.2 s; records how many run at once and the order per patient."""

    name = "test-concurrent"

    def __init__(self, store: Store, opts: ConsumerOptions, concurrency: int) -> None:
        super().__init__(store, opts, concurrency=concurrency)
        self.in_flight = 0
        self.max_in_flight = 0
        self.order: dict[str, list[int]] = {}
        self.handled: Counter[str] = Counter()

    @handles(RecordReceived)
    async def on_record(self, event: RecordReceived) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.2)
        finally:
            self.in_flight -= 1
        self.order.setdefault(event.patient_ref, []).append(event.revision)
        self.handled[event.event_id] += 1


async def test_concurrent_consumer_is_bounded_keeps_per_key_order_and_processes_each_once(
    kafka: str, sqlite_store: Store
) -> None:
    # 4 patients x 3 revisions, all keyed by patient, as the record publisher writes them
    events = [RecordReceived(patient_ref=f"Patient/{p}", revision=r) for r in (1, 2, 3) for p in range(4)]
    with sqlite_store.session() as s:
        for e in events:
            Store.add_to_outbox(s, TOPIC_RECORD_RECEIVED, e, key=e.patient_ref)
    relay = OutboxRelay(sqlite_store, kafka, poll_seconds=0.1)
    await relay.start()
    opts = ConsumerOptions(bootstrap=kafka, group_prefix="test", max_attempts=3, notify_outbox=relay.wake)
    worker = SlowWorker(sqlite_store, opts, concurrency=3)
    await worker.start()
    try:
        await until(lambda: sum(worker.handled.values()) == len(events), timeout=30)
    finally:
        await worker.stop()
        await relay.stop()
    assert worker.max_in_flight == 3  # several at once, never more than the bound
    assert all(revisions == [1, 2, 3] for revisions in worker.order.values()), worker.order
    assert set(worker.handled.values()) == {1}
    assert all(sqlite_store.is_processed(worker.name, e.event_id) for e in events)

