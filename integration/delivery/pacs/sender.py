"""The durable DICOM export queue and its worker.

One ``dicom_exports`` row per (report, destination AE): ``pending`` until the destination stored
the report's SR and SC, then ``sent``; after ``max_attempts`` failures ``dead``, which an
administrator lists and replays through ``/api/dicom-exports``.

Rows are created by the ``dicom-export`` worker when it consumes ``ReportIssued`` for an imaging
report, in the same transaction that marks the event processed (delivery is at least once; the
unique (report, destination) key makes a redelivery a no-op). A sender loop sends due rows with
exponential backoff and jitter. Rows hold no patient data: ids, AE titles, counts and errors that
name the destination and the DICOM status only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from integration.app.settings import DicomPeer
from integration.db.store import Store
from integration.db.tables import AiResult, DicomExport, utcnow
from integration.events.consumer import ConsumerOptions, ConsumerWorker, handles
from integration.phi import uid_hash
from schemas.events import ReportIssued

log = logging.getLogger(__name__)

DICOM_EXPORTER = "dicom-export"
STATES = ("pending", "sent", "dead")



class ExportNotFoundError(LookupError):
    pass


class ExportNotDeadError(ValueError):
    pass


def _aware(value: datetime) -> datetime:
    # SQLite hands datetimes back without their zone; everything is stored in UTC
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def export_peers(peers: list[DicomPeer]) -> list[DicomPeer]:
    """The peers that receive AI results; refuses (at start-up) one without a port."""
    chosen = [p for p in peers if p.export]
    for p in chosen:
        if not p.port:
            raise ValueError(
                f"MEDBRIDGE_DICOM_PEERS: peer {p.ae_title} has export=true but no port; set the port it listens on"
            )
    return chosen


# queue operations (each one transaction) ------------------------------------------------------
@dataclass(frozen=True)
class QueuedExports:
    """The exporter's outcome for a ReportIssued: the pending rows of an imaging report, one per
    destination (none for other kinds, nor for a result that analysed no image), written in the
    transaction that marks the event processed."""

    event: ReportIssued
    destinations: tuple[str, ...]

    def write(self, s: Session) -> None:
        created = add_exports(s, self.event, self.destinations)
        if created:
            log.info("report %s queued for DICOM export to %d destination(s)", self.event.report_id, created)


def add_exports(s: Session, event: ReportIssued, destinations: Sequence[str]) -> int:
    """Add the rows that do not exist yet; returns how many were created."""
    created = 0
    ai = s.get(AiResult, event.report_id)
    # a result without an analysed image has nothing to show the PACS
    if ai is not None and ai.kind == "imaging" and ai.details.get("instances"):
        for ae in destinations:
            exists = s.scalar(
                select(DicomExport.id).where(DicomExport.report_id == event.report_id,
                                             DicomExport.destination_ae == ae)
            )
            if exists is None:
                s.add(DicomExport(report_id=event.report_id, destination_ae=ae, state="pending",
                                  attempts=0, next_attempt_at=utcnow()))
                created += 1
    return created


def enqueue_report(store: Store, event: ReportIssued, destinations: Sequence[str]) -> int:
    """:func:`add_exports` in a transaction of its own; returns how many rows were created."""
    with store.session() as s:
        return add_exports(s, event, destinations)


def claim_due(store: Store, lease_seconds: float, limit: int = 20) -> list[DicomExport]:
    """Pending rows whose time has come, each claimed for ``lease_seconds`` (another process that
    runs the same worker skips them; a crash mid-send frees them when the lease ends)."""
    now = utcnow()
    claimed: list[DicomExport] = []
    with store.session() as s:
        rows = list(s.scalars(
            select(DicomExport)
            .where(DicomExport.state == "pending", DicomExport.next_attempt_at <= now)
            .order_by(DicomExport.next_attempt_at, DicomExport.id)
            .limit(limit)
        ))
        for row in rows:
            result = s.execute(
                update(DicomExport)
                .where(DicomExport.id == row.id, DicomExport.state == "pending", DicomExport.next_attempt_at <= now)
                .values(next_attempt_at=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(row)
    return claimed


def record_success(store: Store, export_id: int) -> None:
    now = utcnow()
    with store.session() as s:
        s.execute(
            update(DicomExport).where(DicomExport.id == export_id)
            .values(state="sent", attempts=DicomExport.attempts + 1, sent_at=now, updated_at=now, last_error=None)
            .execution_options(synchronize_session=False)
        )


def record_failure(
    store: Store, export_id: int, error: str, *, max_attempts: int, backoff: float, max_backoff: float,
    permanent: bool = False,
) -> DicomExport | None:
    """Count a failed attempt: back off exponentially (with jitter), or mark dead after the last
    attempt (or at once when ``permanent``). Returns the updated row."""
    now = utcnow()
    with store.session() as s:
        row = s.get(DicomExport, export_id, with_for_update=True)
        if row is None:
            return None
        row.attempts += 1
        row.last_error = error[:1000]
        row.updated_at = now
        if permanent or row.attempts >= max_attempts:
            row.state = "dead"
        else:
            delay = min(max_backoff, backoff * 2 ** (row.attempts - 1)) * random.uniform(0.75, 1.25)
            row.next_attempt_at = now + timedelta(seconds=delay)
        return row


def list_exports(store: Store, state: str | None = None, limit: int = 100) -> list[DicomExport]:
    with store.session() as s:
        q = select(DicomExport)
        if state:
            q = q.where(DicomExport.state == state)
        return list(s.scalars(q.order_by(DicomExport.id.desc()).limit(limit)))


def replay_export(store: Store, export_id: int) -> DicomExport:
    """Put a dead export back to pending with a fresh attempt budget, due now."""
    now = utcnow()
    with store.session() as s:
        row = s.get(DicomExport, export_id, with_for_update=True)
        if row is None:
            raise ExportNotFoundError(f"DICOM export {export_id} is not known; list them with GET /api/dicom-exports")
        if row.state != "dead":
            raise ExportNotDeadError(
                f"DICOM export {export_id} is {row.state}; only a dead export can be replayed"
            )
        row.state = "pending"
        row.attempts = 0
        row.next_attempt_at = now
        row.updated_at = now
        return row


def count_by_state(store: Store) -> dict[str, int]:
    with store.session() as s:
        counts = dict(s.execute(select(DicomExport.state, func.count()).group_by(DicomExport.state)).all())
    return {state: int(counts.get(state, 0)) for state in STATES}


# the worker ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportPolicy:
    calling_ae: str
    max_attempts: int = 8
    backoff_seconds: float = 5.0
    max_backoff_seconds: float = 600.0
    timeout_seconds: float = 30.0
    poll_seconds: float = 1.0


class DicomExportWorker(ConsumerWorker):
    """Consumes ReportIssued, queues one export per destination, and sends due exports by C-STORE."""

    name = DICOM_EXPORTER

    def __init__(self, store: Store, options: ConsumerOptions, peers: list[DicomPeer], policy: ExportPolicy) -> None:
        super().__init__(store, options)
        self.peers = {p.ae_title: p for p in export_peers(peers)}
        self.policy = policy
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._sender = asyncio.create_task(self._send_loop(), name="dicom-export-sender")

    async def stop(self) -> None:
        if self._sender:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await super().stop()

    def running(self) -> bool:
        return super().running() and self._sender is not None and not self._sender.done()

    def wake(self) -> None:
        self._wake.set()

    @handles(ReportIssued)
    async def on_report_issued(self, event: ReportIssued) -> QueuedExports:
        return QueuedExports(event, tuple(self.peers))

    def stored(self) -> None:
        super().stored()
        self.wake()  # new rows, if any, are sent now rather than at the next poll

    async def send_due(self) -> int:
        """Send every due export once; returns how many were attempted."""
        rows = await asyncio.to_thread(claim_due, self.store, self.policy.timeout_seconds * 4 + 60)
        for row in rows:
            await asyncio.to_thread(self._send_one, row)
        return len(rows)

    def _send_one(self, row: DicomExport) -> None:
        from integration.delivery.pacs.export import ExportBuildError, ExportSendError, build_export, send_datasets

        p = self.policy
        peer = self.peers.get(row.destination_ae)
        try:
            if peer is None or peer.port is None:
                raise ExportBuildError(
                    f"destination {row.destination_ae} is no longer an export peer in MEDBRIDGE_DICOM_PEERS; "
                    "add it back and replay, or leave this export dead"
                )
            ai = self.store.get_ai_result(row.report_id)
            if ai is None or not ai.study_instance_uid:
                raise ExportBuildError(f"report {row.report_id} has no imaging result to export")
            objects = build_export(ai, self.store.study_instances(ai.study_instance_uid))
            send_datasets(objects.datasets, host=peer.host, port=peer.port, called_ae=peer.ae_title,
                          calling_ae=p.calling_ae, timeout=p.timeout_seconds)
        except ExportBuildError as exc:
            record_failure(self.store, row.id, str(exc), max_attempts=p.max_attempts, backoff=p.backoff_seconds,
                           max_backoff=p.max_backoff_seconds, permanent=True)
            log.error("DICOM export %d of report %s is dead: %s", row.id, row.report_id, type(exc).__name__)
            return
        except (ExportSendError, OSError) as exc:
            error = str(exc) if isinstance(exc, ExportSendError) else f"{type(exc).__name__} talking to the peer"
        except Exception as exc:  # noqa: BLE001 - a failed attempt, counted; the message may quote data, so not kept
            # neither the message nor the traceback is kept or logged: either may quote header values
            error = f"{type(exc).__name__} while building or sending the objects; please report it"
            log.error("DICOM export %d of report %s failed: %s", row.id, row.report_id, type(exc).__name__)
        else:
            record_success(self.store, row.id)
            log.info(
                "report %s exported to %s (study %s, %d objects)",
                row.report_id, row.destination_ae, uid_hash(ai.study_instance_uid), len(objects.datasets),
            )
            return
        updated = record_failure(self.store, row.id, error, max_attempts=p.max_attempts, backoff=p.backoff_seconds,
                                 max_backoff=p.max_backoff_seconds)
        if updated is not None and updated.state == "dead":
            log.error("DICOM export %d of report %s is dead after %d attempts; replay it with "
                      "POST /api/dicom-exports/%d/replay", row.id, row.report_id, updated.attempts, row.id)
        elif updated is not None:
            log.warning("DICOM export %d of report %s failed (attempt %d/%d); retrying at %s",
                        row.id, row.report_id, updated.attempts, p.max_attempts,
                        _aware(updated.next_attempt_at).isoformat(timespec="seconds"))

    async def _send_loop(self) -> None:
        while True:
            try:
                await self.send_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop outlives a database hiccup; rows stay pending
                log.warning("DICOM export: sending failed (%s); will retry", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.policy.poll_seconds)
            self._wake.clear()
