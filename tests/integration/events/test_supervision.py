"""Supervision: a loop that dies runs again after a backoff, and a storm of identical log lines
becomes one line per interval."""

from __future__ import annotations

import asyncio
import logging

from integration.events.supervision import RepeatedMessageFilter, Supervised, backoff_seconds
from tests.integration.events.helpers import until


async def test_a_loop_that_dies_is_restarted_and_is_down_meanwhile() -> None:
    runs: list[int] = []
    release = asyncio.Event()

    async def body() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise RuntimeError("died")
        await release.wait()  # the third run lives

    supervised = Supervised("test loop", body, base_seconds=0.2, cap_seconds=0.2)
    supervised.start()
    try:
        await asyncio.sleep(0.02)
        assert not supervised.running() and supervised.state == "restarting"  # waiting out its backoff
        await until(lambda: len(runs) == 3, timeout=5)
        await until(supervised.running, timeout=5)
        assert supervised.restarts == 2 and supervised.last_error == "RuntimeError"
    finally:
        await supervised.stop()
    assert supervised.state == "stopped" and not supervised.running()


async def test_a_loop_that_returns_is_restarted_too() -> None:
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            await asyncio.Event().wait()

    supervised = Supervised("returns", body, base_seconds=0.01, cap_seconds=0.01)
    supervised.start()
    try:
        await until(lambda: runs == 2 and supervised.running(), timeout=5)
        assert supervised.last_error == "exited"
    finally:
        await supervised.stop()


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    for attempt, nominal in ((1, 0.5), (2, 1.0), (3, 2.0), (10, 30.0), (500, 30.0)):
        for _ in range(20):
            assert 0.5 * nominal <= backoff_seconds(attempt) <= 1.5 * nominal


def test_identical_messages_pass_once_per_interval_with_a_count_of_the_rest() -> None:
    now = [0.0]
    flt = RepeatedMessageFilter(interval=30.0, clock=lambda: now[0])

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, msg, args, None)

    passed = [flt.filter(record("Unable connect to node with id %s: %s", i, "refused")) for i in range(250)]
    assert passed.count(True) == 1  # a second's worth of aiokafka's reconnect storm: one line
    assert flt.filter(record("another message")) is True  # other messages are not held back
    now[0] = 31.0
    later = record("Unable connect to node with id %s: %s", 1, "refused")
    assert flt.filter(later) is True
    assert "(and 249 more like it in the last 30 s)" in later.getMessage()


def test_below_its_minimum_level_every_record_passes() -> None:
    """On the retry loops' loggers only warnings are held back: each INFO line says what was delivered."""
    flt = RepeatedMessageFilter(interval=30.0, clock=lambda: 0.0, min_level=logging.WARNING)

    def record(level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("integration.delivery.sender", level, __file__, 1, msg, args, None)

    assert all(flt.filter(record(logging.INFO, "delivery %d sent", i)) for i in range(10))
    outage = [flt.filter(record(logging.ERROR, "a sending round failed (%s)", "StoreUnavailableError"))
              for _ in range(10)]
    assert outage.count(True) == 1
