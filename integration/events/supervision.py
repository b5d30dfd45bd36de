"""Supervision: a long-running loop that dies is restarted, with capped exponential backoff.

Every loop of the runtime (consumers, the outbox relay, the quiet-period publishers, the delivery
senders, the embedded broker's watch) runs under :class:`Supervised`, so one unexpected exception
costs a restart a moment later, not the component until the next manual restart. While a loop is
down (between its death and its restart) ``running()`` is False, which ``/health`` reports by name.

Also here: :func:`backoff_seconds`, the one backoff formula (capped, jittered) the retry loops share,
and :class:`RepeatedMessageFilter`, which keeps a dead peer's connection errors (aiokafka logs one per
attempt, hundreds a second) to one line per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def backoff_seconds(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """The wait before retry ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)`` capped at ``cap``, with
    jitter (x0.5 to x1.5) so that many waiting loops do not retry in step."""
    exponent = min(max(attempt - 1, 0), 30)  # 2**30 * base is past any cap; keeps the float finite
    return min(cap, base * 2**exponent) * (0.5 + random.random())


class Supervised:
    """Runs ``body()`` as one asyncio task and restarts it whenever it raises or returns.

    ``body`` is the component's loop (it normally runs until cancelled). A death is logged with the
    exception's type (its message may quote patient data), counted in ``restarts``, and followed by
    a wait of :func:`backoff_seconds`; a body that ran ``healthy_after`` seconds before dying starts
    the backoff over.
    """

    def __init__(self, name: str, body: Callable[[], Awaitable[None]], *, base_seconds: float = 0.5,
                 cap_seconds: float = 30.0, healthy_after: float = 60.0) -> None:
        self.name = name
        self.body = body
        self.base_seconds = base_seconds
        self.cap_seconds = cap_seconds
        self.healthy_after = healthy_after
        self.restarts = 0
        self.last_error: str | None = None
        self._up = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._up = False

    def running(self) -> bool:
        """True while the body runs (False before start, while waiting to restart, after stop)."""
        return self._up and self._task is not None and not self._task.done()

    @property
    def state(self) -> str:
        if self._task is None or self._task.done():
            return "stopped"
        return "up" if self._up else "restarting"

    async def _supervise(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            self._up = True
            try:
                await self.body()
                self.last_error = "exited"
                log.error("%s stopped on its own; restarting it", self.name)
            except asyncio.CancelledError:
                self._up = False
                raise
            except Exception as exc:  # noqa: BLE001 - supervision: whatever killed the loop, it runs again
                self.last_error = type(exc).__name__
                log.error("%s died (%s); restarting it", self.name, type(exc).__name__)
            self._up = False
            self.restarts += 1
            failures = 1 if time.monotonic() - started >= self.healthy_after else failures + 1
            await asyncio.sleep(backoff_seconds(failures, base=self.base_seconds, cap=self.cap_seconds))


class RepeatedMessageFilter(logging.Filter):
    """Lets a given message (logger, level, text) through once per ``interval`` seconds; the next one
    let through says how many were suppressed in between.

    Installed on aiokafka's loggers: with its broker gone aiokafka logs every failed connection
    attempt (200-250 lines a second, measured), which buries everything else in the log.
    """

    def __init__(self, interval: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 min_level: int = logging.NOTSET) -> None:
        super().__init__()
        self.interval = interval
        self.min_level = min_level  # records below it always pass (a loop's INFO lines say what it did)
        self.clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # key -> (last let through, suppressed)
        self._lock = threading.Lock()  # aiokafka logs from the loop; other libraries from threads

    def forget(self) -> None:
        """Start afresh, as if nothing had been let through yet."""
        with self._lock:
            self._seen.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        key = (record.name, record.levelno, str(record.msg))  # the format, not its arguments: one peer, one key
        now = self.clock()
        with self._lock:
            last, suppressed = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval:
                self._seen[key] = (last, suppressed + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 1000:  # many distinct messages: forget the oldest rather than grow
                oldest = min(self._seen, key=lambda k: self._seen[k][0])
                del self._seen[oldest]
        if suppressed:
            record.msg = f"{record.msg} (and {suppressed} more like it in the last {self.interval:.0f} s)"
        return True


def rate_limit_logger(name: str, interval: float = 30.0, min_level: int = logging.NOTSET) -> RepeatedMessageFilter:
    """Install a :class:`RepeatedMessageFilter` on logger ``name`` and on the loggers below it that
    exist (a filter on a logger does not see its children's records); returns it. Call it after
    importing the library (its modules make their loggers at import); a logger already filtered keeps
    its filter."""
    flt = RepeatedMessageFilter(interval, min_level=min_level)
    for logger_name in [name, *(n for n in list(logging.root.manager.loggerDict) if n.startswith(name + "."))]:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, RepeatedMessageFilter) for f in logger.filters):  # installed once
            logger.addFilter(flt)
    return flt
