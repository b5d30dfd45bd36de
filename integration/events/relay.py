"""The outbox relay: publishes what the store's outbox holds to Kafka, at least once.

Every event is written to the outbox in the transaction of the state it announces; the relay
publishes it, and republishes what its consumer never recorded as processed (the broker may have
lost it), so the store, not the broker, decides what is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from integration.db.store import Store
from integration.events.topics import ensure_topics

log = logging.getLogger(__name__)


class OutboxRelay:
    """Publishes outbox rows to Kafka in order, marks them published; at least once.

    Runs as one task. ``wake()`` is thread-safe so DICOM threads can nudge it.
    """

    def __init__(
        self,
        store: Store,
        bootstrap: str,
        poll_seconds: float = 0.5,
        *,
        consumers_by_topic: dict[str, str] | None = None,
        redeliver_after_seconds: float = 300.0,
    ) -> None:
        self.store = store
        self.bootstrap = bootstrap
        self.poll_seconds = poll_seconds
        # which consumer must record each topic's events as processed; unprocessed ones are republished
        self.consumers_by_topic = consumers_by_topic or {}
        self.redeliver_after_seconds = redeliver_after_seconds
        self._last_requeue = 0.0
        self.producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=2,
            max_request_size=8 * 1024 * 1024,
        )
        await self.producer.start()
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    def wake(self) -> None:
        if self._loop and self._wake:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.producer:
            await self.producer.stop()

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def publish_pending(self) -> int:
        """Send every unpublished outbox row; returns how many were sent."""
        assert self.producer is not None
        sent = 0
        while True:
            rows = await asyncio.to_thread(self.store.pending_outbox, 200)
            if not rows:
                return sent
            futures = [
                await self.producer.send(
                    r.topic,
                    r.payload.encode(),
                    key=r.key.encode() if r.key else None,
                    headers=[("event_type", r.event_type.encode()), ("event_id", r.event_id.encode())],
                )
                for r in rows
            ]
            await asyncio.gather(*futures)
            await asyncio.to_thread(self.store.mark_published, [r.id for r in rows])
            sent += len(rows)

    async def _requeue_if_due(self) -> None:
        now = time.monotonic()
        if not self.consumers_by_topic or now - self._last_requeue < min(30.0, self.redeliver_after_seconds / 2):
            return
        self._last_requeue = now
        requeued = await asyncio.to_thread(
            self.store.requeue_unprocessed, self.consumers_by_topic, self.redeliver_after_seconds
        )
        if requeued:
            log.warning("outbox relay: %d published events were never processed; republishing", requeued)
            # the broker may have lost its topics with them (an embedded broker restarted)
            await ensure_topics(self.bootstrap)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self._requeue_if_due()
                await self.publish_pending()
                self.last_error = None
            except (KafkaError, OSError) as exc:
                self.last_error = type(exc).__name__
                log.warning("outbox relay: broker error %s; will retry", type(exc).__name__)
                await asyncio.sleep(1.0)
            except Exception:  # noqa: BLE001 - the relay must outlive a bad row; the row stays pending
                log.exception("outbox relay: unexpected error; will retry")
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
            self._wake.clear()
