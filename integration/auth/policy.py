"""Which role or SMART scope each route needs, decided from the matched route (method + path template).

Routers get these through one router-level dependency each (integration.app.http), so handlers stay as
they are. A route nobody listed gets the safe default of its router: read scopes for a GET, admin for
anything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from integration.auth.errors import AccessDeniedError
from integration.auth.principal import ADMIN_SCOPE, REVIEW_SCOPE, Principal


@dataclass(frozen=True)
class Requirement:
    """What a request needs: ``permission`` (c/r/u/d/s) on ``resource_type``, or a MedBridge ``scope``
    (review, admin); nothing but a valid token when both are None."""

    resource_type: str | None = None
    permission: str | None = None
    scope: str | None = None

    def describe(self) -> str:
        if self.scope:
            return self.scope
        return f"user/{self.resource_type}.{self.permission} or system/{self.resource_type}.{self.permission}"

    def check(self, principal: Principal) -> None:
        if self.scope is not None and self.scope not in principal.scopes:
            if self.scope not in (REVIEW_SCOPE, ADMIN_SCOPE):
                raise AccessDeniedError(f"no role may do this: {self.scope}", self.scope)
            role = "reviewer" if self.scope == REVIEW_SCOPE else "admin"
            raise AccessDeniedError(f"this needs the {role} role (scope {self.scope})", self.scope)
        if self.resource_type and self.permission and not principal.may(self.resource_type, self.permission):
            raise AccessDeniedError(
                f"this needs scope {self.describe()}; ask for a token with it (see README, Security)",
                f"user/{self.resource_type}.{self.permission} system/{self.resource_type}.{self.permission}")


AUTHENTICATED = Requirement()
ADMIN = Requirement(scope=ADMIN_SCOPE)
# the audit trail is MedBridge's own record: read by admins only, written by nobody through the API
AUDIT_LOG = "AuditEvent"
NOBODY = Requirement(scope="medbridge.audit-write")  # no role has it: MedBridge alone writes the trail

_FHIR_METHOD_PERMISSION = {"POST": "c", "PUT": "u", "DELETE": "d"}


def fhir_requirement(method: str, route_path: str, params: dict[str, Any]) -> Requirement:
    """/fhir: create c, read/vread/instance history r, search and type history s, update u, delete d.
    The base (transaction/batch) needs only a token here; its entries are checked one by one by
    :func:`check_bundle_entries`."""
    resource_type = params.get("resource_type")
    if resource_type is None:  # /fhir/metadata, /fhir (Bundle)
        return AUTHENTICATED
    if resource_type == AUDIT_LOG:
        return NOBODY if method in _FHIR_METHOD_PERMISSION else ADMIN
    if method in _FHIR_METHOD_PERMISSION:
        return Requirement(resource_type, _FHIR_METHOD_PERMISSION[method])
    is_search = route_path in ("/fhir/{resource_type}", "/fhir/{resource_type}/_history")
    return Requirement(resource_type, "s" if is_search else "r")


def check_bundle_entries(principal: Principal, entries: Iterable[Any]) -> None:
    """Each entry of a transaction or batch needs what the same request sent alone would. Entries whose
    type cannot be read are left to the Bundle's own validation, which refuses them (400/422)."""
    for entry in entries:
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or not isinstance(request.get("url"), str):
            continue
        method = str(request.get("method", "")).upper()
        path = request["url"].split("?", 1)[0].strip("/").split("/")
        resource_type = path[0] if path and path[0] else None
        if resource_type is None:
            continue
        if resource_type == AUDIT_LOG:
            (ADMIN if method == "GET" else NOBODY).check(principal)
            continue
        if method == "GET":
            permission = "r" if len(path) > 1 and path[1] != "_history" else "s"
        else:
            permission = _FHIR_METHOD_PERMISSION.get(method, "c")
        Requirement(resource_type, permission).check(principal)


def dicomweb_requirement(method: str, route_path: str, params: dict[str, Any]) -> Requirement:
    """/dicomweb, counted as ImagingStudy: STOW-RS c, QIDO-RS s, WADO-RS r."""
    if method == "POST":
        return Requirement("ImagingStudy", "c")
    is_search = route_path.endswith(("/studies", "/series", "/instances"))
    return Requirement("ImagingStudy", "s" if is_search else "r")


_API_ADMIN_PREFIXES = ("/api/dead-letters", "/api/dicom-exports", "/api/writebacks", "/api/deliveries")


# the lists (worklist, quality metrics, feedback export) are searches over DiagnosticReports
_API_SEARCHES = ("/api/reports", "/api/worklist", "/api/quality", "/api/feedback")


# asking for an image's explanation map makes the imaging worker render it: a reviewer's act, not a read
EXPLANATION_ROUTE = "/api/reports/{report_id}/images/{sop_instance_uid}/explanation"


def api_requirement(method: str, route_path: str, params: dict[str, Any]) -> Requirement:
    """/api: the worklist and report reads need DiagnosticReport read scopes, a review the reviewer role,
    the operational lists and replays the admin role."""
    if route_path.startswith(_API_ADMIN_PREFIXES):
        return ADMIN
    if route_path in ("/api/reports/{report_id}/review", "/api/reports/{report_id}/claim") or (
            method == "POST" and route_path == EXPLANATION_ROUTE):
        return Requirement(scope=REVIEW_SCOPE)
    if method == "GET":
        return Requirement("DiagnosticReport", "s" if route_path in _API_SEARCHES else "r")
    return ADMIN
