"""One AuditEvent per HTTP request, as a FastAPI dependency (``audited``).

A route takes ``Annotated[RequestAudit, audited(FHIR_READ)]``; it names what it touched (``about``) and, when it
writes, records the event in its own transaction (``within``), so the change and its audit are
committed together. Whatever the route did not record (a read, a search, a refused or failed request)
is recorded once the route has finished (a successful read's once its answer is sent), with the outcome its
exception means.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from integration.app.identity import current_actor
from integration.app.services import Services, get_services
from integration.audit.events import Entity, Interaction, Record, outcome_for_status, patient_entity, resource_entity
from integration.audit.trail import record_after, record_in
from integration.errors import (
    ConcurrentWriteError,
    InvalidResourceError,
    MedBridgeError,
    ResourceGoneError,
    ResourceNotFoundError,
    StoreUnavailableError,
    VersionConflictError,
)
from integration.identity import Actor


def http_status(exc: Exception) -> int:
    """The HTTP status the app answers ``exc`` with (see install_exception_handlers)."""
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, RequestValidationError):
        return 422
    if isinstance(exc, InvalidResourceError):
        return exc.status_code
    if isinstance(exc, ResourceGoneError):
        return 410
    if isinstance(exc, ResourceNotFoundError):
        return 404
    if isinstance(exc, VersionConflictError):
        return 412
    if isinstance(exc, ConcurrentWriteError):
        return 409
    if isinstance(exc, StoreUnavailableError):
        return 503
    status = getattr(exc, "status_code", None)
    if isinstance(exc, MedBridgeError) and isinstance(status, int):
        return status
    return 500


class RequestAudit:
    """The AuditEvent of one request, filled in by the route."""

    def __init__(self, record: Record, enabled: bool) -> None:
        self.record = record
        self.enabled = enabled
        self.recorded = False
        self.stored: dict[str, Any] | None = None  # the AuditEvent as written

    @property
    def actor(self) -> Actor:
        return self.record.actor

    def about(self, reference: str | None = None, patient: str | None = None) -> None:
        """Name the resource the request touched and, where known, its Patient (replacing what an earlier
        try of the same write named)."""
        self.record.entities = []
        if reference:
            self.record.entities.append(resource_entity(reference))
        if patient and patient.startswith("Patient/"):
            self.record.entities.append(patient_entity(patient))

    def add(self, entity: Entity) -> None:
        self.record.entities.append(entity)

    def within(self, s: Session) -> None:
        """Record the (successful) event in ``s``, the transaction of the change: kept with it, or not at all.
        A write retried in a fresh transaction calls this again; only the committed one counts."""
        if self.enabled:
            self.stored = record_in(s, self.record)
        self.recorded = True

    def failed(self, exc: Exception) -> None:
        status = http_status(exc)
        self.record.outcome = outcome_for_status(status)
        # the exception's class and status only: its message may quote what the caller sent
        self.record.outcome_desc = f"{status}: {type(exc).__name__}"
        self.recorded = False  # whatever was written with the change was rolled back with it
        self.stored = None


@asynccontextmanager
async def request_audit(svc: Services, actor: Actor, interaction: Interaction) -> AsyncIterator[RequestAudit]:
    """The RequestAudit of one request; on exit its event is written (in its own transaction, on the thread
    pool) unless the request recorded it with its change, with the outcome the request's exception means."""
    audit = RequestAudit(Record(actor, interaction, []), svc.settings.audit_enabled)
    try:
        yield audit
    except Exception as exc:
        audit.failed(exc)
        if audit.enabled:
            audit.stored = await run_in_threadpool(record_after, svc.store, audit.record)
            _forward(svc, audit)
        raise
    if audit.enabled and not audit.recorded:
        audit.stored = await run_in_threadpool(record_after, svc.store, audit.record)
    _forward(svc, audit)


def _forward(svc: Services, audit: RequestAudit) -> None:
    """The committed AuditEvent's copy to the audit repository (a queue: never waits for it)."""
    if svc.audit_forward is not None and audit.stored is not None:
        svc.audit_forward(audit.stored)


def audited(interaction: Interaction) -> Any:
    """The ``Depends`` of a route's RequestAudit for ``interaction`` (see ``request_audit``), for
    ``Annotated[RequestAudit, audited(...)]``.

    Scope "request": what the route did not record with its change (a read's or search's event) is written
    once the answer has been sent. Written before it, every read would wait for the database's write lock
    (SQLite: behind any Bundle being ingested; PostgreSQL: behind a lock on fhir_resources), which a read
    otherwise never does. A refused or failed request's event is written before its error answer (the
    exception reaches this dependency first), and a write's is committed with the write."""

    async def dependency(svc: Annotated[Services, Depends(get_services)],
                         actor: Annotated[Actor, Depends(current_actor)]) -> AsyncIterator[RequestAudit]:
        async with request_audit(svc, actor, interaction) as audit:
            yield audit

    return Depends(dependency, scope="request")
