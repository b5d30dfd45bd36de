"""Who is calling: the identity a validated token carries, its roles, and the SMART v2 scopes they grant.

Pure: no I/O, no web framework. Route policies (integration.auth.policy) and, later, Provenance and
AuditEvent writers read a :class:`Principal`.

Scopes follow SMART App Launch v2 (``system/Observation.rs``, ``user/*.cruds``) and accept the v1 forms
(``.read``, ``.write``, ``.*``). ``patient/`` scopes and scopes narrowed by a query (``?category=...``)
grant nothing here: MedBridge has no launch context to bind a patient to and does not filter by query,
so honouring them would grant more than the token says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

ROLES = ("integration", "reviewer", "admin")
REVIEW_SCOPE = "medbridge.review"  # sign off AI reports (POST /api/reports/{id}/review)
ADMIN_SCOPE = "medbridge.admin"  # dead letters, replays, writeback and export lists, metrics

# What each role may do, as the scopes an external IdP would grant for it
ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    # EHR, PACS, scripts: push records and images, read them back
    "integration": ("system/*.cruds",),
    # a clinician: read the worklist, reports, images and records, and sign; no plain FHIR writes
    "reviewer": ("user/*.rs", REVIEW_SCOPE),
    # operations: everything read-only plus the operational routes
    "admin": ("system/*.rs", ADMIN_SCOPE),
}

_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.(c?r?u?d?s?|read|write|\*)$")
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class ResourceScope:
    """One granted ``context/Type.perms`` scope; ``resource_type`` ``*`` means every type."""

    context: str
    resource_type: str
    permissions: frozenset[str]

    def grants(self, resource_type: str, permission: str) -> bool:
        return self.resource_type in ("*", resource_type) and permission in self.permissions


def parse_scope(scope: str) -> ResourceScope | None:
    """The resource scope ``scope`` grants, or None (not a resource scope, a patient/ scope, a query-narrowed
    scope, or malformed)."""
    match = _SCOPE.match(scope)
    if match is None or match.group(1) == "patient" or not match.group(3):
        return None
    perms = _V1_PERMISSIONS.get(match.group(3), match.group(3))
    return ResourceScope(match.group(1), match.group(2), frozenset(perms))


def scopes_of_roles(roles: Iterable[str]) -> frozenset[str]:
    return frozenset(scope for role in roles for scope in ROLE_SCOPES.get(role, ()))


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request.

    ``sub`` is the token's subject (a user or, for client credentials, the client); ``name`` a display
    name; ``fhir_user`` the FHIR resource the person is (``Practitioner/123``) when the IdP says so;
    ``client_id`` the OAuth client that obtained the token; ``remote_address`` the peer's IP.
    ``scopes`` are the token's own scopes plus those its roles stand for.
    """

    sub: str
    issuer: str
    name: str | None = None
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    fhir_user: str | None = None
    client_id: str | None = None
    remote_address: str | None = None
    token_id: str | None = None
    _resource_scopes: tuple[ResourceScope, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        parsed = tuple(p for p in (parse_scope(s) for s in self.scopes) if p is not None)
        object.__setattr__(self, "_resource_scopes", parsed)

    @property
    def display(self) -> str:
        """A name fit for a review record or an audit line."""
        return self.name or self.sub

    def may(self, resource_type: str, permission: str) -> bool:
        """Whether a scope grants ``permission`` (one of c, r, u, d, s) on ``resource_type``."""
        return any(s.grants(resource_type, permission) for s in self._resource_scopes)

    @property
    def may_review(self) -> bool:
        return REVIEW_SCOPE in self.scopes

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes


def principal_from_claims(claims: dict[str, object], roles_claim: str, remote_address: str | None) -> Principal:
    """The Principal a validated token's claims describe. Scopes come from ``scope`` (space-separated, RFC
    9068) or ``scp`` (a list, as Entra ID sends); roles from ``roles_claim``, a dotted path
    (``realm_access.roles`` for Keycloak)."""
    roles = frozenset(r for r in _strings(_dig(claims, roles_claim)) if r in ROLES)
    raw_scope = claims.get("scope", claims.get("scp"))
    scopes = frozenset(raw_scope.split() if isinstance(raw_scope, str) else _strings(raw_scope))
    return Principal(
        sub=str(claims["sub"]),
        issuer=str(claims["iss"]),
        name=_string(claims.get("name")) or _string(claims.get("preferred_username")),
        roles=roles,
        scopes=scopes | scopes_of_roles(roles),
        fhir_user=_string(claims.get("fhirUser")) or _string(claims.get("fhir_user")),
        client_id=_string(claims.get("client_id")) or _string(claims.get("azp")),
        remote_address=remote_address,
        token_id=_string(claims.get("jti")),
    )


def _dig(claims: dict[str, object], path: str) -> object:
    value: object = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
