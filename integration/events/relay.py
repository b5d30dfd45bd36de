"""The outbox relay: publishes what the store's outbox holds to Kafka, at least once.

Every event is written to the outbox in the transaction of the state it announces; the relay
publishes it, and republishes what its consumer never recorded as processed (the broker may have
lost it), so the store, not the broker, decides what is done. Republishing stops after
``max_publishes`` deliveries: the event is then dead-lettered with that reason (logged, counted in
/health and /metrics), never dropped silently. A row that cannot be sent at all (too large, not
serialisable) is set aside the same way and the others go on. The loop runs under supervision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry.trace import SpanKind

from integration.db.store import Store
from integration.db.tables import OutboxEntry
from integration.events import dead_letters
from integration.events.supervision import Supervised
from integration.events.topics import DEFAULT_PARTITIONS, ensure_topics
from integration.observability import metrics, tracing

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
        max_publishes: int = 5,
        partitions: int = DEFAULT_PARTITIONS,
    ) -> None:
        self.store = store
        self.bootstrap = bootstrap
        self.poll_seconds = poll_seconds
        # which consumer must record each topic's events as processed; unprocessed ones are republished
        self.consumers_by_topic = consumers_by_topic or {}
        self.redeliver_after_seconds = redeliver_after_seconds
        self.max_publishes = max_publishes
        self.partitions = partitions  # of the topics it recreates after a broker lost them
        self._last_requeue = 0.0
        self._requeue_all = False  # the broker lost everything: republish what is unprocessed, however recent
        self.dead_lettered = 0  # events dead-lettered by this relay since start (never processed, unsendable)
        self.producer: AIOKafkaProducer | None = None
        self._supervised = Supervised("outbox relay", self._run)
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
        self._supervised.start()

    def wake(self) -> None:
        if self._loop and self._wake:
            self._loop.call_soon_threadsafe(self._wake.set)

    def broker_restarted(self) -> None:
        """The (embedded) broker came back empty: republish every unprocessed event at the next round,
        not only those older than ``redeliver_after_seconds``. Thread-safe."""
        self._requeue_all = True
        self._last_requeue = 0.0
        self.wake()

    async def stop(self) -> None:
        await self._supervised.stop()
        if self.producer:
            await self.producer.stop()

    def running(self) -> bool:
        return self._supervised.running()

    async def publish_pending(self) -> int:
        """Send every unpublished outbox row; returns how many were sent. A row the broker refuses for
        itself (not a connection or broker failure) is set aside with its reason; the rest go on."""
        assert self.producer is not None
        sent = 0
        while True:
            rows = await asyncio.to_thread(self.store.pending_outbox, 200)
            if not rows:
                return sent
            results = await asyncio.gather(*(self._send(r) for r in rows), return_exceptions=True)
            published: list[int] = []
            for row, result in zip(rows, results, strict=True):
                if isinstance(result, BaseException):
                    if _broker_failure(result):
                        raise result  # the broker is down or busy: every row stays pending
                    await asyncio.to_thread(self._set_aside, row, result)
                else:
                    published.append(row.id)
            await asyncio.to_thread(self.store.mark_published, published)
            sent += len(published)

    async def _send(self, r: OutboxEntry) -> None:
        assert self.producer is not None
        # a send span in the trace of what wrote the row; its traceparent header is the consumer's parent
        with tracing.span(f"send {r.topic}", kind=SpanKind.PRODUCER, parent=r.traceparent, attributes={
                "messaging.system": "kafka", "messaging.operation.type": "send",
                "messaging.destination.name": r.topic, "messaging.message.id": r.event_id}):
            future = await self.producer.send(
                r.topic,
                r.payload.encode(),
                key=r.key.encode() if r.key else None,
                headers=[("event_type", r.event_type.encode()), ("event_id", r.event_id.encode()),
                         *tracing.traceparent_header()],
            )
            await future
        metrics.EVENTS_PUBLISHED.labels(r.topic).inc()

    def _set_aside(self, row: OutboxEntry, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: the outbox relay cannot send this event ({exc})"
        dead_letters.set_aside_outbox_row(self.store, row.id, reason)
        self.dead_lettered += 1
        metrics.EVENTS_DEAD_LETTERED.labels(row.topic).inc()
        log.error("outbox relay: event %s (%s) set aside: %s; see GET /api/dead-letters", row.event_id,
                  row.topic, type(exc).__name__)

    async def _requeue_if_due(self) -> None:
        now = time.monotonic()
        if not self.consumers_by_topic or now - self._last_requeue < min(30.0, self.redeliver_after_seconds / 2):
            return
        self._last_requeue = now
        older_than = 0.0 if self._requeue_all else self.redeliver_after_seconds
        self._requeue_all = False
        given_up = await asyncio.to_thread(
            dead_letters.dead_letter_unprocessed, self.store, self.consumers_by_topic,
            self.redeliver_after_seconds, self.max_publishes,
        )
        for topic, count in given_up.items():
            self.dead_lettered += count
            metrics.EVENTS_DEAD_LETTERED.labels(topic).inc(count)
            log.error("outbox relay: %d event(s) on %s never processed after %d deliveries; dead-lettered "
                      "(see GET /api/dead-letters, replay with POST /api/dead-letters/{id}/replay)",
                      count, topic, self.max_publishes)
        requeued = await asyncio.to_thread(
            self.store.requeue_unprocessed, self.consumers_by_topic, older_than, self.max_publishes
        )
        if requeued:
            log.warning("outbox relay: %d published events were never processed; republishing", requeued)
            # the broker may have lost its topics with them (an embedded broker restarted)
            await ensure_topics(self.bootstrap, self.partitions)

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
            except Exception as exc:  # noqa: BLE001 - the relay must outlive a database outage; rows stay pending
                self.last_error = type(exc).__name__
                log.warning("outbox relay: %s; will retry", type(exc).__name__)
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
            self._wake.clear()


def _broker_failure(exc: BaseException) -> bool:
    """Whether a send failed for the broker's sake (down, busy, a leader moving), not the row's: then
    every row waits. aiokafka marks such errors ``retriable``; a connection error is an OSError."""
    if isinstance(exc, KafkaError):
        return bool(exc.retriable) or type(exc).__name__ in {"KafkaTimeoutError", "ProducerClosed"}
    return isinstance(exc, (OSError, TimeoutError, asyncio.CancelledError))
