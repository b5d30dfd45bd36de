"""Consumers by type: a worker declares the event types it handles; the base does the rest.

    class ImagingWorker(ConsumerWorker):
        name = IMAGING_WORKER

        @handles(StudyReceived)
        async def on_study(self, event: StudyReceived) -> Outcome | None:
            result = await asyncio.to_thread(infer, event)
            return Publish(result, key=event.study_instance_uid)

The worker subscribes to the topics of the types it declares (``schemas.events.TOPIC_OF_EVENT``),
in one consumer group named after it. Each message is parsed into its event model and given to the
handler of its type. What the handler returns, its :class:`Outcome` (an event to publish, a report
to store, or ``None`` for nothing), is written in one transaction with the event's "processed"
mark; this module is the only place that mark is made. The offset is committed after that
transaction, so nothing half-done is acknowledged.

Ack policy, per message:

- already processed (a redelivery: delivery is at least once): skipped, committed;
- unparseable, or of a type the worker declares no handler for: dead-lettered at once (to the
  dead-letter topic and the store's ``dead_letters``, which ``GET /api/dead-letters`` lists), and
  never marked processed, so nothing pretends it was handled; the outbox does not republish
  dead-lettered events;
- a transient failure (:func:`is_transient`: the database unreachable, a broker error, a timeout,
  out of memory, a :class:`~integration.errors.TransientEventError`): the consumer pauses on that
  message and retries it with capped, jittered backoff for as long as the failure lasts; nothing is
  committed and nothing dead-lettered meanwhile. The "already processed" check and the dead-letter
  write are inside that retry, so a database outage pauses the consumer, never kills it;
- an error that will fail again: a :class:`~integration.errors.PermanentEventError` or a pydantic
  ``ValidationError`` is dead-lettered at once; any other exception after ``max_attempts`` attempts.

A worker may handle several events of one fetch at once (``concurrency``, e.g. generations waiting
on an LLM server that batches them): events with the same key still run in offset order, and a
partition's offset is committed only after all its fetched events are stored.

A dead-lettered event can be replayed once (``POST /api/dead-letters/{id}/replay``,
:mod:`integration.events.dead_letters`); the "processed" mark keeps a replay exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.errors import PermanentEventError, StoreUnavailableError, TransientEventError
from integration.events.supervision import Supervised, backoff_seconds
from integration.observability import metrics, tracing
from schemas.events import TOPIC_DEAD_LETTER, TOPIC_OF_EVENT, AnyEvent, parse_event

log = logging.getLogger(__name__)

# what became of a message (medbridge_events_consumed{outcome})
PROCESSED, DUPLICATE, DEAD_LETTERED = "processed", "duplicate", "dead_lettered"


class Outcome(Protocol):
    """A handler's stored work: written in the transaction that marks its event processed."""

    def write(self, s: Session) -> None: ...


@dataclass(frozen=True)
class Publish:
    """Outcome: one event into the outbox, on its type's topic (the outbox relay publishes it)."""

    event: AnyEvent
    key: str | None = None

    def write(self, s: Session) -> None:
        Store.add_to_outbox(s, topic_of(type(self.event)), self.event, key=self.key)


EventHandler = Callable[[Any], Awaitable[Outcome | None]]

# failures that pass: retried for as long as they last, never dead-lettered
_TRANSIENT = (StoreUnavailableError, OperationalError, InterfaceError, KafkaError, TimeoutError, MemoryError,
              TransientEventError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says "not now" rather than "never": the database unreachable (an OperationalError,
    an InterfaceError, a DBAPIError whose connection was invalidated), a broker error, a timeout
    (``asyncio.TimeoutError`` is ``TimeoutError``), out of memory, or a TransientEventError."""
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Outcome | None]])
_HANDLES = "__medbridge_handles__"


def topic_of(event_type: type[AnyEvent]) -> str:
    """The topic ``event_type`` travels on; a TypeError names the table to extend when it has none."""
    try:
        return TOPIC_OF_EVENT[event_type]
    except KeyError:
        raise TypeError(
            f"{event_type.__name__} has no topic: add it to schemas.events.TOPIC_OF_EVENT"
        ) from None


def handles(*event_types: type[AnyEvent]) -> Callable[[_Method], _Method]:
    """Declare a worker method the handler of ``event_types`` (``async def on_x(self, event) -> Outcome | None``)."""
    if not event_types:
        raise TypeError("@handles needs at least one event type")
    for event_type in event_types:
        topic_of(event_type)  # an event type without a topic fails at import, not at the first message

    def declare(method: _Method) -> _Method:
        is_async = inspect.iscoroutinefunction(method)  # kept apart: the TypeGuard would retype ``method``
        if not is_async:
            raise TypeError(f"@handles: {method.__qualname__} must be `async def`")
        setattr(method, _HANDLES, event_types)
        return method

    return declare


def topics_for(event_types: Mapping[type[AnyEvent], object]) -> tuple[str, ...]:
    """The topics to subscribe for ``event_types``, each once, in declaration order."""
    return tuple(dict.fromkeys(topic_of(t) for t in event_types))


def handler_registry(cls: type) -> dict[type[AnyEvent], str]:
    """Event type -> name of the method that handles it, over ``cls`` and its bases (a subclass's
    declaration wins). Two methods of one class declaring the same type is a TypeError."""
    registry: dict[type[AnyEvent], str] = {}
    for klass in reversed(cls.__mro__):
        declared_here: dict[type[AnyEvent], str] = {}
        for attr, member in vars(klass).items():
            for event_type in getattr(member, _HANDLES, ()):
                if event_type in declared_here:
                    raise TypeError(
                        f"{klass.__name__} handles {event_type.__name__} twice "
                        f"({declared_here[event_type]} and {attr}): keep one handler per event type"
                    )
                declared_here[event_type] = attr
        registry.update(declared_here)
    return registry


class EventConsumer:
    """One consumer group on the topics of ``handlers``' event types: handle, store, then commit
    offset + 1 (see the module docstring for the ack policy)."""

    def __init__(
        self,
        *,
        name: str,
        group_id: str,
        bootstrap: str,
        store: Store,
        handlers: Mapping[type[AnyEvent], EventHandler],
        max_attempts: int = 3,
        dead_letter_producer: Callable[[], AIOKafkaProducer | None] | None = None,
        on_stored: Callable[[], None] = lambda: None,
        retry_base_seconds: float = 0.5,
        retry_cap_seconds: float = 30.0,
        concurrency: int = 1,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"consumer {name!r}: concurrency must be >= 1")
        if not handlers:
            raise TypeError(f"consumer {name!r} handles no event type; declare at least one with @handles")
        self.name = name
        self.handlers = dict(handlers)
        self.topics = topics_for(self.handlers)
        self.group_id = group_id
        self.bootstrap = bootstrap
        self.store = store
        self.max_attempts = max_attempts
        self._dlq_producer = dead_letter_producer
        self._on_stored = on_stored  # e.g. wakes the outbox relay, so a result event leaves at once
        self.retry_base_seconds = retry_base_seconds
        self.retry_cap_seconds = retry_cap_seconds
        self.concurrency = concurrency  # events handled at once (see _handle_batch)
        # how soon a dead member (a SIGKILLed worker process) leaves the group and its partitions move on
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.paused_since: float | None = None  # monotonic time a transient failure paused the consumer
        self._consumer: AIOKafkaConsumer | None = None
        self._supervised = Supervised(f"consumer {name}", self._run)

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
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
        )
        await self._consumer.start()
        self._supervised.start()  # a loop that dies is restarted (integration.events.supervision)

    async def stop(self) -> None:
        await self._supervised.stop()
        if self._consumer:
            await self._consumer.stop()

    def running(self) -> bool:
        return self._supervised.running()

    @property
    def restarts(self) -> int:
        return self._supervised.restarts

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=max(10, 2 * self.concurrency))
            except KafkaError as exc:
                log.warning("%s: fetch failed (%s); backing off", self.name, type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            if self.concurrency > 1:
                await self._handle_batch(consumer, batches)
                continue
            for tp, messages in batches.items():
                for msg in messages:
                    # Cancellation inside _handle() propagates before the commit: nothing half-done is acked.
                    await self._process(tp, msg)
                    await self._commit(consumer, tp, msg.offset + 1)
                    self._observe_lag(consumer, tp, msg.offset + 1)

    async def _process(self, tp: TopicPartition, msg: ConsumerRecord[Any, Any]) -> None:
        """One message through the ack policy, inside its "process" span (the child of the producer's, from
        the message's traceparent header), counted in medbridge_events_consumed and timed."""
        began = time.perf_counter()
        with tracing.span(f"process {msg.topic}", kind=SpanKind.CONSUMER,
                          parent=tracing.header_traceparent(msg.headers), attributes={
                              "messaging.system": "kafka", "messaging.operation.type": "process",
                              "messaging.destination.name": msg.topic,
                              "messaging.consumer.group.name": self.group_id,
                              "messaging.destination.partition.id": str(tp.partition),
                              "messaging.kafka.offset": msg.offset}):
            outcome = await self._handle(msg.value or b"", msg.topic)
        metrics.EVENTS_CONSUMED.labels(self.name, msg.topic, outcome).inc()
        metrics.EVENT_PROCESSING_SECONDS.labels(self.name, msg.topic).observe(time.perf_counter() - began)

    def _observe_lag(self, consumer: AIOKafkaConsumer, tp: TopicPartition, position: int) -> None:
        """medbridge_consumer_lag for ``tp``: the partition's end (as the last fetch saw it) minus our position."""
        end = consumer.highwater(tp)
        if end is not None:
            metrics.CONSUMER_LAG.labels(self.group_id, tp.topic, str(tp.partition)).set(max(0, end - position))

    async def _handle_batch(
        self, consumer: AIOKafkaConsumer, batches: Mapping[TopicPartition, list[ConsumerRecord[Any, Any]]]
    ) -> None:
        """Up to ``concurrency`` events of one fetch in flight at once, with the guarantees of the
        one-at-a-time loop: events with the same key (one patient, one study) run in offset order,
        each after the previous one is stored; a partition's offset is committed only once all its
        fetched events are done, so a crash or a cancellation mid-batch acknowledges nothing of
        that partition (redelivered events are skipped by their "processed" mark)."""
        slots = asyncio.Semaphore(self.concurrency)

        async def handle(tp: TopicPartition, msg: ConsumerRecord[Any, Any], after: asyncio.Task[None] | None) -> None:
            if after is not None:
                await asyncio.shield(after)  # the same key's previous event first
            async with slots:
                await self._process(tp, msg)

        async def partition(
            tg: asyncio.TaskGroup, tp: TopicPartition, messages: list[ConsumerRecord[Any, Any]]
        ) -> None:
            last_of_key: dict[bytes, asyncio.Task[None]] = {}
            tasks: list[asyncio.Task[None]] = []
            for msg in messages:
                task = tg.create_task(handle(tp, msg, last_of_key.get(msg.key) if msg.key is not None else None))
                if msg.key is not None:
                    last_of_key[msg.key] = task
                tasks.append(task)
            await asyncio.gather(*tasks)
            await self._commit(consumer, tp, messages[-1].offset + 1)
            self._observe_lag(consumer, tp, messages[-1].offset + 1)

        async with asyncio.TaskGroup() as tg:
            for tp, messages in batches.items():
                if messages:
                    tg.create_task(partition(tg, tp, messages))

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        for attempt in range(5):
            try:
                await consumer.commit({tp: offset})
                return
            except KafkaError as exc:
                # A rebalance took the partition: the new owner reprocesses, idempotently.
                log.warning("%s: commit failed (%s), attempt %d", self.name, type(exc).__name__, attempt + 1)
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _handle(self, raw: bytes, topic: str) -> str:
        """Handle one message by the ack policy; what became of it: processed, duplicate or dead_lettered."""
        try:
            event = parse_event(raw)
        except ValidationError as exc:
            await self._dead_letter(topic, None, raw, f"unparseable event: {exc.error_count()} errors")
            return DEAD_LETTERED
        handler = self.handlers.get(type(event))
        if handler is None:
            await self._dead_letter(topic, event.event_id, raw, self._not_declared(event.event_type, topic))
            return DEAD_LETTERED
        attempt = 0  # failures that will fail again, up to max_attempts
        paused = 0  # transient failures in a row: they do not count against max_attempts
        while True:
            try:
                # checked on every attempt: a duplicate that another member stored meanwhile is done
                if await asyncio.to_thread(self.store.is_processed, self.name, event.event_id):
                    log.debug("%s: event %s already processed", self.name, event.event_id)
                    return DUPLICATE
                outcome = await handler(event)
                await asyncio.to_thread(self._store, event.event_id, outcome)
            except (PermanentEventError, ValidationError) as exc:
                await self._dead_letter(topic, event.event_id, raw, f"{type(exc).__name__}: {exc}")
                return DEAD_LETTERED
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - ack policy: pause on transient, retry, then dead-letter
                if is_transient(exc):
                    paused += 1
                    metrics.EVENT_RETRIES.labels(self.name, "transient").inc()
                    await self._pause(event.event_id, exc, paused)
                    continue
                attempt += 1
                log.warning("%s: event %s failed (attempt %d/%d): %s", self.name, event.event_id, attempt,
                            self.max_attempts, type(exc).__name__)
                if attempt >= self.max_attempts:
                    await self._dead_letter(topic, event.event_id, raw, f"{type(exc).__name__}: {exc}")
                    return DEAD_LETTERED
                metrics.EVENT_RETRIES.labels(self.name, "failure").inc()
                await asyncio.sleep(backoff_seconds(attempt + 1, base=self.retry_base_seconds,
                                                    cap=min(10.0, self.retry_cap_seconds)))
                continue
            self._resumed()
            self._on_stored()
            return PROCESSED

    async def _pause(self, event_id: str | None, exc: BaseException, streak: int) -> None:
        """Wait before retrying after a transient failure; logged on the first and then every 20th."""
        if self.paused_since is None:
            self.paused_since = time.monotonic()
        if streak == 1 or streak % 20 == 0:
            log.warning("%s: paused on event %s: %s (transient, try %d); retrying with backoff, nothing is "
                        "dead-lettered", self.name, event_id or "<unparseable>", type(exc).__name__, streak)
        await asyncio.sleep(backoff_seconds(streak, base=self.retry_base_seconds, cap=self.retry_cap_seconds))

    def _resumed(self) -> None:
        if self.paused_since is not None:
            log.warning("%s: resumed after %.1f s paused", self.name, time.monotonic() - self.paused_since)
            self.paused_since = None

    def _store(self, event_id: str, outcome: Outcome | None) -> None:
        """The handler's work and the "processed" mark, in one transaction: both or neither."""
        with self.store.session() as s:
            if outcome is not None:
                outcome.write(s)
            Store.mark_processed(s, self.name, event_id)

    def _not_declared(self, event_type: str, topic: str) -> str:
        declared = ", ".join(sorted(t.__name__ for t in self.handlers))
        return (
            f"{self.name} has no handler for {event_type} (it handles {declared}); "
            f"check what publishes {event_type} to {topic}, or give {self.name} a @handles method for it, "
            "then replay the event"
        )

    async def _dead_letter(self, topic: str, event_id: str | None, raw: bytes, error: str) -> None:
        streak = 0
        while True:  # the store may be down: the letter waits for it, the message is not committed before
            try:
                await asyncio.to_thread(self.store.record_dead_letter, self.name, topic, event_id, error, raw)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dead letter is never dropped; retried until stored
                streak += 1
                await self._pause(event_id, exc, streak)
        self._resumed()
        metrics.EVENTS_DEAD_LETTERED.labels(topic).inc()
        log.error("%s: event %s dead-lettered (%s); see GET /api/dead-letters", self.name,
                  event_id or "<unparseable>", error.split(":", 1)[0][:120])
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


@dataclass(frozen=True)
class ConsumerOptions:
    """What every worker's consumer needs from the composition root."""

    bootstrap: str
    group_prefix: str
    max_attempts: int
    notify_outbox: Callable[[], None]
    dead_letter_producer: Callable[[], AIOKafkaProducer | None] | None = None
    # the backoff of a consumer paused on a transient failure (first wait, longest wait)
    retry_base_seconds: float = 0.5
    retry_cap_seconds: float = 30.0
    # group membership (MEDBRIDGE_KAFKA_SESSION_TIMEOUT_MS, MEDBRIDGE_KAFKA_HEARTBEAT_INTERVAL_MS)
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000


class ConsumerWorker:
    """Base of the workers: one consumer group named after the worker, on the topics of the event
    types its ``@handles`` methods declare.

    Subclasses set ``name``, load their model in ``load()`` (a missing model is a start-up error)
    and declare one ``@handles(EventType)`` method per type; each returns the :class:`Outcome` to
    store with the "processed" mark, or ``None``. ``concurrency`` > 1 lets that many handlers run at
    once (events of one key still one after another); handlers must then be safe to run concurrently.
    """

    name: ClassVar[str] = ""
    # event type -> name of its handler method, and the topics they travel on: built per subclass
    handled: ClassVar[dict[type[AnyEvent], str]] = {}
    topics: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handled = handler_registry(cls)
        cls.topics = topics_for(cls.handled)

    def __init__(self, store: Store, options: ConsumerOptions, *, concurrency: int = 1) -> None:
        if not self.name:
            raise TypeError(f"{type(self).__name__} needs a `name`: its consumer group and processed-event key")
        self.store = store
        self.notify_outbox = options.notify_outbox
        self.consumer = EventConsumer(
            name=self.name,
            group_id=f"{options.group_prefix}.{self.name}",
            bootstrap=options.bootstrap,
            store=store,
            handlers={event_type: getattr(self, method) for event_type, method in self.handled.items()},
            max_attempts=options.max_attempts,
            dead_letter_producer=options.dead_letter_producer,
            on_stored=self.stored,
            retry_base_seconds=options.retry_base_seconds,
            retry_cap_seconds=options.retry_cap_seconds,
            concurrency=concurrency,
            session_timeout_ms=options.session_timeout_ms,
            heartbeat_interval_ms=options.heartbeat_interval_ms,
        )

    async def load(self) -> None:
        """Load models before consuming; the default has none."""

    def stored(self) -> None:
        """Called after an event's outcome is committed; the default wakes the outbox relay."""
        self.notify_outbox()

    async def start(self) -> None:
        await self.load()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    def running(self) -> bool:
        return self.consumer.running()
