"""Transient versus permanent failures in EventConsumer, over the real broker and both engines: what
will pass (a timeout, a database outage, a TransientEventError) pauses the consumer for as long as it
lasts and never dead-letters; what will fail again (a ValidationError) dead-letters at once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import psycopg
from aiokafka import AIOKafkaProducer

from integration.db.store import Store
from integration.errors import TransientEventError
from integration.events.consumer import ConsumerOptions, ConsumerWorker, handles
from schemas.events import TOPIC_RECORD_RECEIVED, RecordReceived
from tests.conftest import PG_ADMIN_URL
from tests.integration.events.helpers import until


def fast_options(kafka: str) -> ConsumerOptions:
    return ConsumerOptions(bootstrap=kafka, group_prefix="failures", max_attempts=3, notify_outbox=lambda: None,
                           retry_base_seconds=0.02, retry_cap_seconds=0.2)


class Flaky(ConsumerWorker):
    """Raises what ``fail(patient_ref, attempt)`` names, else succeeds."""

    name = "flaky"

    def __init__(self, store: Store, opts: ConsumerOptions,
                 fail: Callable[[str, int], BaseException | None]) -> None:
        super().__init__(store, opts)
        self.fail = fail
        self.attempts: Counter[str] = Counter()
        self.done: list[str] = []

    @handles(RecordReceived)
    async def on_record(self, event: RecordReceived) -> None:
        self.attempts[event.patient_ref] += 1
        error = self.fail(event.patient_ref, self.attempts[event.patient_ref])
        if error is not None:
            raise error
        self.done.append(event.patient_ref)


def _invalid() -> Exception:
    try:
        RecordReceived.model_validate({"patient_ref": 3})
    except Exception as exc:  # noqa: BLE001 - the pydantic ValidationError is what we want
        return exc
    raise AssertionError("should not validate")


def _fail(ref: str, attempt: int) -> BaseException | None:
    if ref == "Patient/transient" and attempt <= 6:  # twice max_attempts: it still must not dead-letter
        return TransientEventError("the model server is restarting")
    if ref == "Patient/timeout" and attempt <= 4:
        return TimeoutError()
    if ref == "Patient/oom" and attempt <= 4:
        return MemoryError()
    if ref == "Patient/invalid":
        return _invalid()
    return None


async def _send(kafka: str, *refs: str) -> list[RecordReceived]:
    events = [RecordReceived(patient_ref=r, revision=1) for r in refs]
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    try:
        for e in events:
            await producer.send_and_wait(TOPIC_RECORD_RECEIVED, e.model_dump_json().encode(), key=b"one")
    finally:
        await producer.stop()
    return events


async def test_transient_failures_are_retried_past_max_attempts_and_validation_errors_dead_letter(
    kafka: str, store: Store
) -> None:
    worker = Flaky(store, fast_options(kafka), _fail)
    await worker.start()
    try:
        await _send(kafka, "Patient/transient", "Patient/timeout", "Patient/oom", "Patient/invalid", "Patient/ok")
        await until(lambda: "Patient/ok" in worker.done, timeout=60)
    finally:
        await worker.stop()
    assert worker.done == ["Patient/transient", "Patient/timeout", "Patient/oom", "Patient/ok"]
    assert worker.attempts["Patient/transient"] == 7 and worker.attempts["Patient/timeout"] == 5
    assert worker.attempts["Patient/invalid"] == 1  # will fail again: no retry
    (letter,) = store.dead_letters()
    assert letter.error.startswith("ValidationError")


def _allow_connections(url: str, allowed: bool) -> None:
    """Open or close the test database to every connection (its owner may): a database outage."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


async def test_a_database_outage_pauses_the_consumer_and_nothing_is_lost_or_dead_lettered(
    kafka: str, postgres_store: Store, postgres_url: str
) -> None:
    worker = Flaky(postgres_store, fast_options(kafka), lambda _r, _n: None)
    await worker.start()
    try:
        await _send(kafka, "Patient/before")
        await until(lambda: worker.done == ["Patient/before"], timeout=60)
        _allow_connections(postgres_url, False)
        try:
            # is_processed fails first: the handler is not even reached while the database is away
            await _send(kafka, "Patient/during")
            await until(lambda: worker.consumer.paused_since is not None, timeout=30)
            assert worker.running() and worker.consumer.restarts == 0  # paused, not dead
            assert worker.done == ["Patient/before"]
        finally:
            _allow_connections(postgres_url, True)
        await until(lambda: worker.done == ["Patient/before", "Patient/during"], timeout=60)
        await until(lambda: worker.consumer.paused_since is None, timeout=10)
    finally:
        await worker.stop()
    assert worker.attempts["Patient/during"] == 1  # processed once
    assert postgres_store.dead_letters() == []
