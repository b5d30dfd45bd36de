"""The sender loop that drains one kind of delivery job (``ehr`` or ``pacs``); ``start()`` / ``stop()``.

Each round claims the due jobs of its kind (integration.delivery.queue) and hands each to
``deliver``. A transient failure backs the job off and skips the rest of that destination's jobs for
the round (it is probably down), so a long outage costs one attempt per round, not one per queued
report; a permanent one makes the job dead at once. The loop runs every ``poll_seconds`` and at once
when woken (the runtime wakes it after every write that may have queued something).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from opentelemetry.trace import SpanKind

from integration.db.store import Store
from integration.db.tables import DeliveryJob, utcnow
from integration.delivery import queue
from integration.delivery.queue import ClaimedJob, Kind, RetryPolicy
from integration.errors import MedBridgeError, StoreUnavailableError
from integration.events.supervision import Supervised, backoff_seconds
from integration.observability import tracing

_T = TypeVar("_T")
log = logging.getLogger(__name__)


class DeliveryError(MedBridgeError):
    """A delivery attempt failed. ``permanent`` ones make the job dead at once; the rest are retried.
    ``str()`` is what an administrator reads with the job; ``brief`` is what the log gets (the
    destination's own error text may quote patient data, so it stays out of the log)."""

    def __init__(self, message: str, *, permanent: bool, brief: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.brief = brief or message


class DeliverySender(ABC):
    """Sends the queued jobs of one kind; subclasses say how one job is delivered."""

    kind: Kind
    name: str  # for logs and task names

    def __init__(self, store: Store, policy: RetryPolicy, poll_seconds: float) -> None:
        self.store = store
        self.policy = policy
        self.poll_seconds = poll_seconds
        self._supervised: Supervised | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None

    @abstractmethod
    async def deliver(self, job: ClaimedJob) -> str | None:
        """Send one job; returns what the destination calls it (kept as ``delivered_as``). Raises
        DeliveryError; any other exception counts as a transient failure."""

    def replay_hint(self, job_id: int) -> str:
        return f"replay it with POST /api/deliveries/{job_id}/replay"

    def label(self, destination: str) -> str:
        """How the log names a destination (a subclass leaves out what may be secret)."""
        return destination

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._supervised = Supervised(self.name, self._run)  # restarted, with backoff, if the loop dies
        self._supervised.start()

    async def stop(self) -> None:
        if self._supervised is not None:
            await self._supervised.stop()
            self._supervised = None

    def running(self) -> bool:
        return self._supervised is not None and self._supervised.running()

    def wake(self) -> None:
        """Send what is due now. Thread-safe, as the outbox relay's and the publishers' wake: request
        threads, DICOM threads and workers' threads call it after a write (asyncio.Event is not)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            try:
                await self.send_due()
            except Exception as exc:  # noqa: BLE001 - the loop outlives a database hiccup; the jobs stay queued
                # the type only: a database error's text can quote a payload, which may hold patient data
                log.error("%s: a sending round failed (%s); retrying in %.1f s", self.name, type(exc).__name__,
                          self.poll_seconds)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    async def send_due(self) -> int:
        """One round: every due job of this kind, in order. Returns how many were sent."""
        jobs = await asyncio.to_thread(queue.claim_due, self.store, self.kind, self.policy.lease_seconds)
        down: set[str] = set()
        sent = 0
        store_down = False
        for job in jobs:
            if store_down or job.destination in down:
                # leased by this round: hand it back at once rather than when the lease ends (minutes)
                await self._until_recorded(lambda j=job: self._release(j))
                continue
            try:
                attributes = {"medbridge.delivery.kind": self.kind, "medbridge.delivery.what": job.what,
                              "medbridge.delivery.destination": self.label(job.destination),
                              "medbridge.delivery.attempt": job.attempts + 1}
                with tracing.span(f"deliver {self.kind}", kind=SpanKind.CLIENT, parent=job.traceparent,
                                  attributes=attributes):
                    delivered_as = await self.deliver(job)
            except StoreUnavailableError:
                # our database went away, not the destination: no attempt counted; the job and the rest
                # of the round go back to the queue once the database is back
                store_down = True
                await self._until_recorded(lambda j=job: self._release(j))
                continue
            except DeliveryError as exc:
                await self._until_recorded(lambda j=job, e=exc: self._failed(j, e))
                if not exc.permanent:
                    down.add(job.destination)
                continue
            except Exception as exc:  # noqa: BLE001 - counted as a failed attempt, never lost
                # neither the message nor the traceback is kept: either may quote patient data
                error = DeliveryError(f"{type(exc).__name__} while delivering; please report it", permanent=False)
                await self._until_recorded(lambda j=job, e=error: self._failed(j, e))
                down.add(job.destination)
                continue
            if await self._until_recorded(lambda j=job, d=delivered_as: queue.record_success(self.store, j, d)):
                sent += 1
                self.last_error = None
                log.info("%s: delivery %d (%s report %s) sent to %s", self.name, job.id, job.what, job.report_id,
                         self.label(job.destination))
        return sent

    async def _until_recorded(self, record: Callable[[], _T]) -> _T:
        """Record what became of a leased job (sent, failed, handed back), retrying while the database is
        away. Given up, the job would wait for its lease to end (minutes), holding back the report's later
        jobs, and one that went out would be sent again."""
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(record)
            except StoreUnavailableError:
                attempt += 1
                if attempt == 1:
                    log.warning("%s: the database is unavailable; recording a delivery's outcome when it is back",
                                self.name)
                await asyncio.sleep(backoff_seconds(attempt, base=0.5, cap=10.0))

    def _release(self, job: ClaimedJob) -> None:
        with self.store.session() as s:
            row = s.get(DeliveryJob, job.id, with_for_update=True)
            if row is not None and row.claim == job.claim and row.state == "pending":
                row.next_attempt_at = utcnow()

    def _failed(self, job: ClaimedJob, exc: DeliveryError) -> None:
        row = queue.record_failure(self.store, job, str(exc), self.policy, permanent=exc.permanent)
        self.last_error = exc.brief
        if row is None:
            return  # the lease ended and another sender holds the job: its outcome stands
        if row.state == "dead":
            log.error("%s: delivery %d (%s report %s) to %s is dead after %d attempt(s): %s; see GET "
                      "/api/deliveries?state=dead and %s", self.name, job.id, job.what, job.report_id,
                      self.label(job.destination), row.attempts, exc.brief, self.replay_hint(job.id))
        else:
            log.warning("%s: delivery %d (%s report %s) to %s failed (attempt %d/%d): %s; retrying at %s",
                        self.name, job.id, job.what, job.report_id, self.label(job.destination), row.attempts,
                        self.policy.max_attempts, exc.brief,
                        queue.aware(row.next_attempt_at).isoformat(timespec="seconds"))
