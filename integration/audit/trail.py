"""Writing AuditEvents: in the transaction of the change they record (``record_in``), or in a
transaction of their own right after a read, a search or a refusal (``record_after``).

AuditEvents are stored as FHIR resources (``GET /fhir/AuditEvent`` searches them by date, agent, entity,
patient, type, subtype, action and outcome). Writing one is not itself audited, and a read of
AuditEvents records one AuditEvent like any other read, so the trail never feeds on itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from integration.audit.events import LOGIN, Entity, Interaction, Record, audit_event, outcome_for_status
from integration.db.store import Store
from integration.errors import StoreUnavailableError
from integration.fhir.storage import put_resources
from integration.identity import Actor

log = logging.getLogger(__name__)


def record_in(s: Session, record: Record) -> dict[str, Any]:
    """Write the AuditEvent of ``record`` in session ``s`` (the transaction of the change it records):
    both are kept, or neither. Returns the stored AuditEvent."""
    # a fresh id: no locking SELECT for a row that cannot exist, and the bulk INSERTs of a Bundle's path
    ((stored, _),) = put_resources(s, [audit_event(record)], [None], fresh=[True])
    return stored


def record_after(store: Store, record: Record) -> dict[str, Any] | None:
    """Write the AuditEvent of ``record`` in a transaction of its own (after a read, or after a change
    that failed and left nothing to record it with). A store that cannot take it is logged, not raised:
    the answer the caller is about to get does not depend on it."""
    try:
        with store.session() as s:
            return record_in(s, record)
    except StoreUnavailableError:
        log.error("audit event (%s, outcome %s) not recorded: the store is unavailable",
                  record.interaction.type.get("code"), record.outcome)
        return None


def audit_refusal(
    store: Store,
    actor: Actor,
    status_code: int,
    reason: str,
    interaction: Interaction | None = None,
    entities: list[Entity] | None = None,
    forward: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Record a refused access: 401 (authentication failed: recorded as a failed login) or 403 (an
    authenticated caller without the right role or scope for ``interaction``). For the auth layer.

    ``reason`` goes into outcomeDesc: say why in words (``"token expired"``, ``"needs role admin"``),
    never quote the token or patient data. ``forward``: Services.audit_forward (the syslog copy), if any."""
    chosen = LOGIN if status_code == 401 or interaction is None else interaction
    stored = record_after(store, Record(actor, chosen, entities or [], outcome_for_status(status_code),
                                        f"{status_code}: {reason}"))
    if stored is not None and forward is not None:
        forward(stored)


def audit_login(store: Store, actor: Actor, forward: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Record a successful login (a token issued to, or a password checked for, ``actor``). For the auth
    layer; a failed one is ``audit_refusal(..., 401, reason)``."""
    stored = record_after(store, Record(actor, LOGIN, []))
    if stored is not None and forward is not None:
        forward(stored)
