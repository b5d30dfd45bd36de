"""The HTTP side of identity and access: who is calling (bearer tokens), what the route needs, the
login and key routes of the embedded issuer, and the Host/Origin/Content-Type guards.

Errors become FHIR OperationOutcomes here and nowhere else: 401 with ``WWW-Authenticate: Bearer``,
403 with ``error="insufficient_scope"``, 503 when the issuer cannot be asked for a key.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
from fastapi import APIRouter, Depends, FastAPI, Form, Request, Response
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from integration.app.identity import current_actor
from integration.app.settings import Settings
from integration.audit.trail import audit_login, audit_refusal
from integration.auth.embedded import EmbeddedIssuer
from integration.auth.errors import (
    AccessDeniedError,
    AuthenticationError,
    IssuerUnavailableError,
    UnsupportedMediaTypeError,
)
from integration.auth.keys import KeyCache, KeySource, RemoteIssuer
from integration.auth.policy import ADMIN, Requirement
from integration.auth.principal import Principal, principal_from_claims
from integration.auth.tokens import TokenValidator, ValidationPolicy
from integration.auth.users import authenticate_user
from integration.identity import Actor, anonymous_actor

Policy = Callable[[str, str, dict[str, Any]], Requirement]
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)
_FHIR_JSON = {"application/fhir+json", "application/json", "application/json+fhir"}
# shown by /docs (the Authorize button) and declared in the OpenAPI document
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer",
                           description="An access token: `medbridge token --role ...`, POST /auth/token, "
                                       "or your OpenID provider (MEDBRIDGE_OIDC_ISSUER)")


@dataclass
class Authenticator:
    """Turns a request's bearer token into a :class:`Principal`; ``embedded`` is set in the embedded mode."""

    validator: TokenValidator
    roles_claim: str
    embedded: EmbeddedIssuer | None

    async def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if not header:
            raise AuthenticationError("this needs a bearer token (Authorization: Bearer ...)", invalid_token=False)
        match = _BEARER.match(header)
        if match is None:
            raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
        claims = await self.validator.validate(match.group(1))
        remote = request.client.host if request.client else None
        return principal_from_claims(claims, self.roles_claim, remote)


def build_authenticator(settings: Settings) -> Authenticator:
    """The embedded issuer (key made under the data dir at first start) unless MEDBRIDGE_OIDC_ISSUER names
    an external one; both are validated the same way."""
    embedded = None
    source: KeySource
    if settings.oidc_issuer:
        source = RemoteIssuer(settings.oidc_issuer)
    else:
        embedded = EmbeddedIssuer(settings.signing_key_path, settings.oidc_audience)
        source = embedded
    algorithms = tuple(a.strip() for a in settings.oidc_algorithms.split(",") if a.strip())
    policy = ValidationPolicy(source.issuer, settings.oidc_audience, algorithms, settings.oidc_leeway_seconds)
    validator = TokenValidator(policy, KeyCache(source, settings.oidc_jwks_refresh_seconds))
    return Authenticator(validator, settings.oidc_roles_claim, embedded)


def _authenticator(request: Request) -> Authenticator:
    return request.app.state.authenticator  # type: ignore[no-any-return]


def authorize(policy: Policy) -> Callable[..., Awaitable[Principal]]:
    """A router-level dependency: authenticates the caller, checks what ``policy`` says the matched route
    needs, and leaves the Principal on ``request.state.principal`` for the handler."""

    async def dependency(request: Request, _: Annotated[Any, Depends(bearer_scheme)]) -> Principal:
        principal = await _authenticator(request).principal(request)
        request.state.principal = principal  # also for the audit of a refusal below: who was refused
        route = request.scope.get("route")
        policy(request.method, getattr(route, "path", request.url.path), request.path_params).check(principal)
        return principal

    return dependency


async def current_principal(request: Request) -> Principal:
    """The authenticated caller, for handlers behind :func:`authorize` (Provenance, AuditEvent, reviews)."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        raise AuthenticationError("this needs a bearer token (Authorization: Bearer ...)", invalid_token=False)
    return principal  # type: ignore[no-any-return]


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def metrics_access(request: Request, _: Annotated[Any, Depends(bearer_scheme)]) -> None:
    """/metrics needs the admin role unless MEDBRIDGE_METRICS_PUBLIC is true."""
    if request.app.state.services.settings.metrics_public:
        return
    ADMIN.check(await _authenticator(request).principal(request))


async def fhir_json_only(request: Request) -> None:
    """FHIR writes take FHIR JSON only: a form or text/plain body (what a web page can post across
    origins without a preflight) gets 415."""
    if request.method not in ("POST", "PUT"):
        return
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in _FHIR_JSON:
        raise UnsupportedMediaTypeError(media_type)


# --- the embedded issuer's routes -----------------------------------------------------------------
router = APIRouter(prefix="/auth", tags=["auth"])


def _embedded(request: Request) -> EmbeddedIssuer:
    issuer = _authenticator(request).embedded
    if issuer is None:
        raise AuthenticationError("MedBridge uses an external identity provider (MEDBRIDGE_OIDC_ISSUER): "
                                  "get tokens there", invalid_token=False)
    return issuer


@router.get("/.well-known/openid-configuration", summary="Discovery document of the embedded issuer")
def embedded_discovery(request: Request) -> dict[str, Any]:
    return _embedded(request).discovery()


@router.get("/jwks.json", summary="Public keys of the embedded issuer")
def embedded_jwks(request: Request) -> dict[str, Any]:
    return _embedded(request).jwks()


@router.post("/token", summary="Password login of a local user (embedded mode): an access token")
def password_login(
    request: Request,
    username: Annotated[str, Form(max_length=128)],
    password: Annotated[str, Form(max_length=1024)],
    grant_type: Annotated[str, Form()] = "password",
) -> Response:
    issuer = _embedded(request)
    if grant_type != "password":
        return _oauth_error("unsupported_grant_type", "only grant_type=password is supported here")
    services = request.app.state.services
    user = authenticate_user(services.store, username, password)
    if user is None:
        # the typed name is not recorded: a password typed into the name box would land in the audit trail
        _audit_login(services, request, None, "password login refused: unknown user name or wrong password")
        return _oauth_error("invalid_grant", "unknown user name or wrong password")
    _audit_login(services, request, user.name, None)
    ttl = services.settings.login_token_ttl_seconds
    token = issuer.mint(subject=user.name, roles=list(user.roles), name=user.display_name or user.name,
                        ttl_seconds=ttl, client_id="medbridge-login")
    body = {"access_token": token, "token_type": "Bearer", "expires_in": ttl}
    return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


async def _audit_refusal(request: Request, status: int, reason: str) -> None:
    """A refused access becomes an AuditEvent (a failed login for 401), written off the event loop. The
    reason is MedBridge's own wording (why the token or the role did not do), never the token."""
    services = getattr(request.app.state, "services", None)
    if services is None or not services.settings.audit_enabled:
        return
    actor = await current_actor(request)
    await asyncio.to_thread(audit_refusal, services.store, actor, status, reason[:200],
                            forward=services.audit_forward)


def _audit_login(services: Any, request: Request, subject: str | None, refusal: str | None) -> None:
    if not services.settings.audit_enabled:
        return
    address = request.client.host if request.client else None
    if refusal is None and subject is not None:
        audit_login(services.store, Actor(sub=subject, name=subject, address=address), services.audit_forward)
    else:
        audit_refusal(services.store, anonymous_actor(address), 401, refusal or "login refused",
                      forward=services.audit_forward)


def _oauth_error(error: str, description: str) -> Response:
    # RFC 6749 §5.2
    return Response(orjson.dumps({"error": error, "error_description": description}), status_code=400,
                    media_type="application/json", headers={"Cache-Control": "no-store"})


# --- errors ---------------------------------------------------------------------------------------
def _outcome(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": message}]}
    return Response(orjson.dumps(body), status_code=status, media_type="application/fhir+json", headers=headers)


def _quoted(text: str) -> str:
    """``text`` as an RFC 6750 quoted value may hold it: printable ASCII without ``"`` and ``\\``."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(AuthenticationError)
    async def _unauthenticated(request: Request, exc: AuthenticationError) -> Response:
        challenge = 'Bearer realm="medbridge"'
        if exc.invalid_token:
            challenge += f', error="invalid_token", error_description="{_quoted(str(exc))}"'
        await _audit_refusal(request, 401, str(exc))
        return _outcome(401, "login", str(exc), {"WWW-Authenticate": challenge})

    @app.exception_handler(AccessDeniedError)
    async def _forbidden(request: Request, exc: AccessDeniedError) -> Response:
        challenge = f'Bearer realm="medbridge", error="insufficient_scope", scope="{_quoted(exc.needed)}"'
        await _audit_refusal(request, 403, str(exc))
        return _outcome(403, "forbidden", str(exc), {"WWW-Authenticate": challenge})

    @app.exception_handler(IssuerUnavailableError)
    async def _issuer_down(_: Request, exc: IssuerUnavailableError) -> Response:
        return _outcome(503, "transient", str(exc), {"Retry-After": "10"})

    @app.exception_handler(UnsupportedMediaTypeError)
    async def _media_type(_: Request, exc: UnsupportedMediaTypeError) -> Response:
        return _outcome(415, "not-supported", str(exc))


# --- Host and Origin ------------------------------------------------------------------------------
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """localhost names, the configured HTTP host (unless a wildcard) and MEDBRIDGE_ALLOWED_HOSTS."""
    hosts = set(LOCAL_HOSTS) | {h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()}
    if settings.http_host not in ("", "0.0.0.0", "::"):
        hosts.add(settings.http_host.lower())
    return frozenset(hosts)


def _host_name(host: str) -> str:
    """The name in a Host header or an origin's netloc, without the port (``[::1]:8000`` -> ``::1``)."""
    return _host_and_port(host)[0]


def _host_and_port(netloc: str) -> tuple[str, int | None]:
    parts = urlsplit(f"//{netloc}")
    try:
        return (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is not a number: matches nothing
        return "", -1


class NetworkGuard:
    """Refuses requests whose ``Host`` is not an allowed name (DNS rebinding: a page on evil.example
    resolving to 127.0.0.1) with 421, and state-changing requests from another browser ``Origin`` than
    this server's own or MEDBRIDGE_CORS_ORIGINS with 403."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str], origins: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        host = headers.get("host", "")
        refusal = None
        if "*" not in self.hosts and _host_name(host) not in self.hosts:
            refusal = _outcome(421, "forbidden", "this Host name is not served here; add it to MEDBRIDGE_ALLOWED_HOSTS")
        elif scope["method"] in _STATE_CHANGING and "origin" in headers:
            origin = headers["origin"].rstrip("/")
            same = _host_and_port(urlsplit(origin).netloc) == _host_and_port(host) != ("", -1)
            if not same and origin not in self.origins:
                refusal = _outcome(403, "forbidden", "requests from this web origin may not change data here; "
                                                     "list it in MEDBRIDGE_CORS_ORIGINS if it should")
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _authenticated(request: Request, _: Annotated[Any, Depends(bearer_scheme)]) -> Principal:
    principal = await _authenticator(request).principal(request)
    request.state.principal = principal
    return principal


@router.get("/me", summary="Who the bearer token says the caller is (any valid token)")
async def who_am_i(principal: Annotated[Principal, Depends(_authenticated)]) -> dict[str, Any]:
    return {"sub": principal.sub, "name": principal.name, "display": principal.display,
            "roles": sorted(principal.roles), "scopes": sorted(principal.scopes), "fhirUser": principal.fhir_user,
            "client_id": principal.client_id, "issuer": principal.issuer, "remote_address": principal.remote_address}
