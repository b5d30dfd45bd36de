"""What the HTTP routes need at run time, built by the composition root and put on ``app.state``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from integration.app.settings import Settings
from integration.db.store import Store
from integration.fhir.validation import ValidationWorkers


@dataclass
class Services:
    settings: Settings
    store: Store
    # named liveness checks that /health reports (broker, store, each worker, ...)
    health_checks: dict[str, Callable[[], bool]] = field(default_factory=dict)
    # nudges the outbox relay after a write, so events leave at once rather than at the next poll
    notify_outbox: Callable[[], None] = lambda: None
    # wakes the study publisher once studies are due (STOW-RS, like the listener on release)
    on_study_ready: Callable[[], None] = lambda: None
    # worker processes that validate part of each large transaction Bundle (integration.fhir.validation)
    fhir_validation: ValidationWorkers | None = None
    # a copy of each committed AuditEvent for an audit repository (integration.audit.syslog), if configured
    audit_forward: Callable[[dict[str, Any]], None] | None = None
    # named details /health shows beside the checks (the DICOM listener's admission, ...)
    health_details: dict[str, Callable[[], object]] = field(default_factory=dict)
    # more Prometheus text for /metrics (counters the edges keep)
    metrics_text: list[Callable[[], str]] = field(default_factory=list)


async def body_within(request: Request, max_bytes: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``max_bytes`` (by its declared
    Content-Length, or while it streams): an oversized body is never held whole in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain def dependency on its thread pool, a thread hop per request (~0.2 ms)
    return request.app.state.services
