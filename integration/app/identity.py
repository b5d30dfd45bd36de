"""The one place the HTTP edge learns who the caller is (the seam with integration.auth).

The authentication layer validates the bearer token and sets ``request.state.principal``; routes take
``ActorDep`` and never look at the principal themselves, so wiring authentication in changes this module
only. Without a principal (authentication not installed yet, or a test app without it) the caller is
the anonymous actor, with its network address still recorded.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Depends, Request

from integration.identity import Actor, anonymous_actor

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: Any) -> str | None:
    """A claim as text for the record, control characters replaced (a token may carry any string, and a
    NUL would make the AuditEvent and review row unstorable on PostgreSQL)."""
    return _CONTROL.sub("\ufffd", value) if isinstance(value, str) and value else None


def actor_from_principal(principal: Any, address: str | None) -> Actor:
    """Map the auth layer's principal (any object with ``sub``, ``name``, ``fhir_user``, ``roles``,
    ``client_id``; missing ones are None/empty) onto an Actor."""
    roles = getattr(principal, "roles", None) or ()
    return Actor(
        sub=_text(str(principal.sub)) or "-",
        name=_text(getattr(principal, "name", None)),
        fhir_user=_text(getattr(principal, "fhir_user", None)),
        roles=frozenset(_CONTROL.sub("\ufffd", str(r)) for r in roles),
        client_id=_text(getattr(principal, "client_id", None)),
        address=address,
    )


async def current_actor(request: Request) -> Actor:
    """The caller of this request (async: no thread hop for a dependency of every route)."""
    address = request.client.host if request.client else None
    principal = getattr(request.state, "principal", None)
    if principal is None:
        return anonymous_actor(address)
    return actor_from_principal(principal, address)


ActorDep = Annotated[Actor, Depends(current_actor)]
