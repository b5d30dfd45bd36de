"""Who is acting: the authenticated identity that reviews, audit and Provenance record.

The authentication layer (integration.auth) proves the identity and puts it on ``request.state.principal``;
``integration.app.identity.current_actor`` turns that into an :class:`Actor`. Everything below the HTTP
edge takes an Actor, never a typed name, so what is recorded is who was authenticated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the identifier system of an actor's ``sub`` (the token subject) where no fhirUser reference is known
SUBJECT_SYSTEM = "urn:medbridge:sub"
ANONYMOUS_SUB = "anonymous"


@dataclass(frozen=True)
class Actor:
    """An authenticated (or, before authentication is configured, anonymous) caller.

    ``fhir_user``: a FHIR reference such as ``Practitioner/123`` when the identity provider gives one;
    ``address``: the caller's network address (for AuditEvent.agent.network)."""

    sub: str
    name: str | None = None
    fhir_user: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    client_id: str | None = None
    address: str | None = None

    @property
    def display(self) -> str:
        """A human-readable name: the display name, else the subject."""
        return self.name or self.sub

    @property
    def anonymous(self) -> bool:
        return self.sub == ANONYMOUS_SUB

    def reference(self) -> dict[str, object]:
        """A FHIR Reference to this actor: the fhirUser where known, else a display and an identifier
        holding the subject (R4 allows a Reference by identifier alone)."""
        ref: dict[str, object] = {"display": self.display}
        if self.fhir_user:
            ref["reference"] = self.fhir_user
        else:
            ref["identifier"] = {"system": SUBJECT_SYSTEM, "value": self.sub}
        return ref


def anonymous_actor(address: str | None = None) -> Actor:
    """The caller when no authentication layer has identified one."""
    return Actor(sub=ANONYMOUS_SUB, name="anonymous", address=address)
