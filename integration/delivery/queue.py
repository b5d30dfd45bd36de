"""The one durable delivery queue: every result MedBridge sends downstream is a ``delivery_jobs`` row.

A job is ``pending`` until its destination has it (``sent``), or ``dead`` once it failed permanently
or ``max_attempts`` times; an administrator lists dead jobs and replays them. Jobs are added inside
the caller's transaction (``enqueue``: the report writer's or the review's, so a result and its
deliveries commit together), and taken by a sender with a lease (``claim_due``): another process on
the same database skips a leased job, and a sender that dies mid-send leaves it due again when the
lease ends. A sender records the outcome with the claim it took, so one whose lease ran out cannot
overwrite what the next holder did. Jobs of one (kind, destination, report) go in id order: a review
never overtakes the report it reviews.

Each function is one transaction; none logs or stores patient data (the API shows no payload).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session, aliased

from integration.db.store import Store
from integration.db.tables import DeliveryJob, utcnow
from integration.observability import tracing

Kind = Literal["ehr", "pacs"]
State = Literal["pending", "sent", "dead"]
What = Literal["issued", "reviewed", "rewritten"]  # rewritten: a report changed after its create was sent
STATES: tuple[State, ...] = ("pending", "sent", "dead")


class JobNotFoundError(LookupError):
    """No delivery job has that id (of that kind)."""


class JobNotDeadError(ValueError):
    """Only a dead job can be replayed; the message says what state it is in."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a kind of delivery is retried: ``backoff_seconds`` after the first failure, doubled after
    each further one with +-25 % jitter (so many jobs failing together do not retry together), at
    most ``max_backoff_seconds``; dead after ``max_attempts`` once the job is also ``retry_for_seconds``
    old, so a destination down for hours (an EHR's maintenance window) delays deliveries without
    killing them. ``lease_seconds`` must outlast one send."""

    max_attempts: int
    backoff_seconds: float
    max_backoff_seconds: float
    lease_seconds: float
    retry_for_seconds: float = 0.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        exponential = self.backoff_seconds * 2 ** min(attempts - 1, 60)
        return min(self.max_backoff_seconds, exponential * random.uniform(0.75, 1.25))


@dataclass(frozen=True)
class ClaimedJob:
    """A job a sender holds: what it needs to send it, and the claim that proves it still holds it."""

    id: int
    kind: str
    destination: str
    report_id: str
    what: str
    review_id: int | None
    review_action: str | None
    payload: dict[str, Any]
    attempts: int
    claim: int
    traceparent: str | None = None  # the trace of the report or review that queued it


def aware(value: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; everything is stored in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# adding (inside the caller's transaction) --------------------------------------------------------
def enqueue(
    s: Session,
    kind: Kind,
    destination: str,
    report_id: str,
    what: What,
    payload: dict[str, Any] | None = None,
    *,
    review_id: int | None = None,
    review_action: str | None = None,
) -> DeliveryJob:
    """Add a pending job, due now, to the caller's session (it commits with the caller's change)."""
    now = utcnow()
    job = DeliveryJob(kind=kind, destination=destination, report_id=report_id, what=what, payload=payload or {},
                      review_id=review_id, review_action=review_action, state="pending", attempts=0, claim=0,
                      next_attempt_at=now, created_at=now, updated_at=now, traceparent=tracing.current_traceparent())
    s.add(job)
    return job


def issued_job(s: Session, kind: Kind, destination: str, report_id: str) -> DeliveryJob | None:
    """The job that delivers the issued report to ``destination``, if there is one (a rewritten report
    refreshes it rather than adding another)."""
    return s.scalars(
        select(DeliveryJob).where(DeliveryJob.kind == kind, DeliveryJob.destination == destination,
                                  DeliveryJob.report_id == report_id, DeliveryJob.what == "issued")
        .order_by(DeliveryJob.id)
    ).first()


# sending ----------------------------------------------------------------------------------------
def last_job(s: Session, kind: Kind, destination: str, report_id: str) -> DeliveryJob | None:
    """The latest job queued for the report to ``destination`` (any state)."""
    return s.scalars(
        select(DeliveryJob).where(DeliveryJob.kind == kind, DeliveryJob.destination == destination,
                                  DeliveryJob.report_id == report_id)
        .order_by(DeliveryJob.id.desc())
    ).first()


def _due(kind: Kind, now: datetime) -> Any:
    """Pending jobs of ``kind`` whose time has come and that no earlier unsent job of the same report
    and destination holds back."""
    earlier = aliased(DeliveryJob)
    blocker = (
        select(earlier.id)
        .where(and_(earlier.kind == DeliveryJob.kind, earlier.destination == DeliveryJob.destination,
                    earlier.report_id == DeliveryJob.report_id, earlier.id < DeliveryJob.id,
                    earlier.state != "sent"))
        .exists()
    )
    return (
        select(DeliveryJob)
        .where(DeliveryJob.kind == kind, DeliveryJob.state == "pending", DeliveryJob.next_attempt_at <= now,
               ~blocker)
        .order_by(DeliveryJob.id)
    )


def claim_due(store: Store, kind: Kind, lease_seconds: float, limit: int = 50) -> list[ClaimedJob]:
    """Take up to ``limit`` due jobs of ``kind`` for ``lease_seconds``, oldest first. A job another
    sender took in the meantime is skipped."""
    now = utcnow()
    claimed: list[ClaimedJob] = []
    with store.session() as s:
        for job in list(s.scalars(_due(kind, now).limit(limit))):
            taken = s.execute(
                update(DeliveryJob)
                .where(DeliveryJob.id == job.id, DeliveryJob.claim == job.claim, DeliveryJob.state == "pending")
                .values(claim=job.claim + 1, next_attempt_at=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(ClaimedJob(job.id, job.kind, job.destination, job.report_id, job.what, job.review_id,
                                          job.review_action, dict(job.payload or {}), job.attempts, job.claim + 1,
                                          job.traceparent))
    return claimed


def _held(s: Session, job: ClaimedJob) -> DeliveryJob | None:
    """The row of a claimed job, locked, while the claim is still this sender's (None otherwise)."""
    row = s.get(DeliveryJob, job.id, with_for_update=True)
    return row if row is not None and row.claim == job.claim and row.state == "pending" else None


def record_success(store: Store, job: ClaimedJob, delivered_as: str | None = None) -> bool:
    """Mark a claimed job sent. False when the claim was lost (the lease ended and another sender
    took the job): the other sender's outcome stands."""
    now = utcnow()
    with store.session() as s:
        row = _held(s, job)
        if row is None:
            return False
        row.state, row.sent_at, row.updated_at, row.last_error = "sent", now, now, None
        row.attempts += 1
        row.delivered_as = delivered_as
        return True


def record_failure(
    store: Store, job: ClaimedJob, error: str, policy: RetryPolicy, *, permanent: bool = False
) -> DeliveryJob | None:
    """Count a failed attempt: due again after the policy's backoff, or dead after the last attempt
    (at once when ``permanent``). ``error`` is what an administrator reads; it must name no patient.
    Returns the updated row, or None when the claim was lost."""
    now = utcnow()
    with store.session() as s:
        row = _held(s, job)
        if row is None:
            return None
        row.attempts += 1
        row.last_error = error[:2000]
        row.updated_at = now
        retried_long_enough = now - aware(row.created_at) >= timedelta(seconds=policy.retry_for_seconds)
        if permanent or (row.attempts >= policy.max_attempts and retried_long_enough):
            row.state = "dead"
        else:
            row.next_attempt_at = now + timedelta(seconds=policy.delay(row.attempts))
        return row


def record_conflict(store: Store, job: ClaimedJob, conflict: dict[str, Any]) -> None:
    """Keep ``conflict`` (both versions of what could not be written) in the claimed job's payload, for
    the administrator who reconciles them, and for the replay that then overrides what was recorded."""
    with store.session() as s:
        row = _held(s, job)
        if row is not None:
            row.payload = {**row.payload, "conflict": conflict}


# administration ---------------------------------------------------------------------------------
def list_jobs(
    store: Store, kind: Kind | None = None, state: State | None = None, limit: int = 100, *,
    newest_first: bool = False,
) -> list[DeliveryJob]:
    with store.read_session() as s:
        q = select(DeliveryJob)
        if kind:
            q = q.where(DeliveryJob.kind == kind)
        if state:
            q = q.where(DeliveryJob.state == state)
        order = DeliveryJob.id.desc() if newest_first else DeliveryJob.id
        return list(s.scalars(q.order_by(order).limit(limit)))


def replay(store: Store, job_id: int, kind: Kind | None = None) -> DeliveryJob:
    """Put a dead job back to pending with a fresh attempt budget, due now. Raises JobNotFoundError
    (no such job, or not of ``kind``) or JobNotDeadError."""
    now = utcnow()
    with store.session() as s:
        row = s.get(DeliveryJob, job_id, with_for_update=True)
        if row is None or (kind is not None and row.kind != kind):
            raise JobNotFoundError(f"delivery {job_id} is not known")
        if row.state != "dead":
            raise JobNotDeadError(f"delivery {job_id} is {row.state}; only a dead delivery can be replayed")
        row.state, row.attempts, row.next_attempt_at, row.updated_at, row.last_error = "pending", 0, now, now, None
        return row


def counts(store: Store, kind: Kind) -> dict[str, int]:
    """Jobs of ``kind`` per state (the pending and dead counts are the backlog gauges)."""
    with store.read_session() as s:
        rows = s.execute(select(DeliveryJob.state, func.count()).where(DeliveryJob.kind == kind)
                         .group_by(DeliveryJob.state)).all()
    found = {state: int(n) for state, n in rows}
    return {state: found.get(state, 0) for state in STATES}
