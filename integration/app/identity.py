"""The one place the HTTP edge learns who the caller is (the seam with integration.auth).

The authentication layer validates the bearer token and sets ``request.state.principal``; routes take
``ActorDep`` and never look at the principal themselves, so wiring authentication in changes this module
only. Without a principal (authentication not installed yet, or a test app without it) the caller is
the anonymous actor, with its network address still recorded.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from integration.identity import Actor, anonymous_actor


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def actor_from_principal(principal: Any, address: str | None) -> Actor:
    """Map the auth layer's principal (any object with ``sub``, ``name``, ``fhir_user``, ``roles``,
    ``client_id``; missing ones are None/empty) onto an Actor."""
    roles = getattr(principal, "roles", None) or ()
    return Actor(
        sub=str(principal.sub),
        name=_text(getattr(principal, "name", None)),
        fhir_user=_text(getattr(principal, "fhir_user", None)),
        roles=frozenset(str(r) for r in roles),
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
