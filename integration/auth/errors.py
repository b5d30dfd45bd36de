"""The authentication package's exceptions, translated to HTTP by integration.auth.web only."""

from __future__ import annotations

from integration.errors import MedBridgeError


class AuthenticationError(MedBridgeError):
    """No token, or one that cannot be trusted (HTTP 401). ``invalid_token`` is False when no credentials
    were sent at all (RFC 6750 §3.1: then the challenge names no error)."""

    def __init__(self, message: str, *, invalid_token: bool = True) -> None:
        super().__init__(message)
        self.invalid_token = invalid_token


class AccessDeniedError(MedBridgeError):
    """A trusted identity without the role or scope a route needs (HTTP 403). ``needed`` names them."""

    def __init__(self, message: str, needed: str) -> None:
        super().__init__(message)
        self.needed = needed


class IssuerUnavailableError(MedBridgeError):
    """A token names a key MedBridge does not hold and the issuer cannot be asked for it (HTTP 503):
    the request is refused, never let through."""


class UnsupportedMediaTypeError(MedBridgeError):
    """A FHIR write whose body is not FHIR JSON (HTTP 415): what a cross-origin form or text post would be."""

    def __init__(self, media_type: str) -> None:
        shown = "".join(c for c in media_type[:60] if c.isprintable()) or "no type"
        super().__init__(f"send FHIR JSON (Content-Type: application/fhir+json), not {shown}")
