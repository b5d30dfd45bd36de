"""What the event tests share: a store, outbox rows, and waiting for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sqlalchemy import select

from integration.db.store import Store
from integration.db.tables import OutboxEntry
from schemas.events import TOPIC_RECORD_RECEIVED, RecordReceived


def queue_events(store: Store, n: int) -> list[RecordReceived]:
    """``n`` RecordReceived events in the outbox, as the publishers write them."""
    events = [RecordReceived(patient_ref=f"Patient/{i}", revision=1) for i in range(n)]
    with store.session() as s:
        for e in events:
            Store.add_to_outbox(s, TOPIC_RECORD_RECEIVED, e, key=e.patient_ref)
    return events


def outbox(store: Store, topic: str) -> list[OutboxEntry]:
    with store.session() as s:
        return list(s.scalars(select(OutboxEntry).where(OutboxEntry.topic == topic).order_by(OutboxEntry.id)))


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
