"""MedBridge as its own token issuer (the default when no MEDBRIDGE_OIDC_ISSUER is set).

An EC P-256 key is made at first use under the data dir (``auth/signing-key.pem``, mode 0600). Tokens are
ES256 JWT access tokens (RFC 9068 shape); the issuer's discovery document and JWKS are served at
``/auth/.well-known/openid-configuration`` and ``/auth/jwks.json`` and checked by the same
:class:`~integration.auth.keys.KeyCache` an external issuer is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from integration.app.settings import Settings
from integration.auth.principal import ROLES, scopes_of_roles

EMBEDDED_ISSUER = "urn:medbridge:embedded-issuer"
DEFAULT_AUDIENCE = "medbridge"
MAX_TTL_SECONDS = 30 * 24 * 3600


class EmbeddedIssuer:
    """Signs tokens with the key at ``key_path`` (made there, 0600, if missing) and publishes its JWKS."""

    def __init__(self, key_path: Path, audience: str = DEFAULT_AUDIENCE, issuer: str = EMBEDDED_ISSUER) -> None:
        self.key_path = key_path
        self.audience = audience
        self.issuer = issuer
        self._key = load_or_create_key(key_path)
        self.kid = _thumbprint(self._public_jwk())

    # --- KeySource: the documents the validator reads ---------------------------------------------
    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": "/auth/jwks.json",
            "token_endpoint": "/auth/token",
            "grant_types_supported": ["password"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "scopes_supported": sorted({s for r in ROLES for s in scopes_of_roles([r])}),
        }

    def jwks(self, jwks_uri: str = "/auth/jwks.json") -> dict[str, Any]:
        # the key file is read again, so a key replaced on disk is picked up on the next unknown kid
        current = load_or_create_key(self.key_path)
        if current.private_numbers() != self._key.private_numbers():
            self._key = current
            self.kid = _thumbprint(self._public_jwk())
        return {"keys": [{**self._public_jwk(), "kid": self.kid, "use": "sig", "alg": "ES256"}]}

    # --- issuing ---------------------------------------------------------------------------------
    def mint(self, *, subject: str, roles: list[str], name: str | None = None, ttl_seconds: int = 3600,
             client_id: str = "medbridge-cli", fhir_user: str | None = None) -> str:
        """A signed access token for ``subject`` holding ``roles`` (and the scopes they stand for)."""
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown role(s) {', '.join(unknown)}; choose from {', '.join(ROLES)}")
        if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
            raise ValueError(f"the lifetime must be between 1 second and {MAX_TTL_SECONDS // 86400} days")
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": subject, "client_id": client_id,
            "iat": now, "nbf": now, "exp": now + ttl_seconds, "jti": str(uuid.uuid4()),
            "roles": sorted(set(roles)), "scope": " ".join(sorted(scopes_of_roles(roles))),
        }
        if name:
            claims["name"] = name
        if fhir_user:
            claims["fhirUser"] = fhir_user
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid, "typ": "at+jwt"})

    def _public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        return jwk


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EC private key at ``path``; a new one is written there first (0600, folder 0700) if none is."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: use theirs
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key; delete it to have MedBridge make a new one")
    return key


def _thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256) of an EC public key, used as its kid."""
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


class EmbeddedIssuerRefused(RuntimeError):
    """MedBridge cannot make tokens: an external issuer is configured."""


def embedded_token(settings: Settings, roles: list[str], subject: str, name: str | None = None,
                   ttl_seconds: int = 3600) -> str:
    """A token from the embedded issuer (the key under the data dir), for ``medbridge token``, the demo and
    the benchmarks; refused when an external issuer is configured, whose tokens MedBridge cannot make."""
    if settings.oidc_issuer:
        raise EmbeddedIssuerRefused(
            f"MEDBRIDGE_OIDC_ISSUER is set: get a token from {settings.oidc_issuer} (client credentials) and "
            "pass it with --token or MEDBRIDGE_TOKEN")
    issuer = EmbeddedIssuer(settings.signing_key_path, settings.oidc_audience)
    return issuer.mint(subject=subject, roles=roles, name=name, ttl_seconds=ttl_seconds)
