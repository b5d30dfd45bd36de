"""Validation of bearer access tokens (JWT), the same for the embedded issuer and an external one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import jwt

from integration.auth.errors import AuthenticationError
from integration.auth.keys import KeyCache

# Asymmetric algorithms only: ``none`` and HMAC (HS*) are never accepted, so a token "signed" with the
# issuer's public key as an HMAC secret is refused before any signature check
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# the key types each algorithm family needs (a token's alg must fit the key its kid names)
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True)
class ValidationPolicy:
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS
    leeway_seconds: float = 30.0


class TokenValidator:
    """Checks signature (key by ``kid`` from the issuer's JWKS), algorithm, ``exp``/``nbf``/``iat`` (with
    leeway), ``iss`` and ``aud``. Returns the claims, or raises AuthenticationError (401) or
    IssuerUnavailableError (503, from the key cache)."""

    def __init__(self, policy: ValidationPolicy, keys: KeyCache) -> None:
        unsafe = [a for a in policy.algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if unsafe:
            raise ValueError(f"MEDBRIDGE_OIDC_ALGORITHMS may list only {', '.join(ASYMMETRIC_ALGORITHMS)}; "
                             f"remove {', '.join(unsafe)}")
        self.policy = policy
        self.keys = keys

    async def validate(self, token: str) -> dict[str, Any]:
        kid, alg = self._header(token)
        key = self.keys.cached(kid) or await asyncio.to_thread(self.keys.fetch_for, kid)
        if key is None:
            raise AuthenticationError("the token's signing key is not one the issuer publishes")
        return self._decode(token, key, alg)

    def validate_blocking(self, token: str) -> dict[str, Any]:
        kid, alg = self._header(token)
        key = self.keys.cached(kid) or self.keys.fetch_for(kid)
        if key is None:
            raise AuthenticationError("the token's signing key is not one the issuer publishes")
        return self._decode(token, key, alg)

    def _header(self, token: str) -> tuple[str, str]:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError("the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("the token is not a signed JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.policy.algorithms:
            accepted = ", ".join(self.policy.algorithms)
            raise AuthenticationError(f"the token's algorithm is not accepted (only {accepted})")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("the token names no signing key (kid)")
        return kid, alg

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        if _KEY_TYPE.get(alg[:2]) != key.key_type:
            raise AuthenticationError("the token's algorithm does not fit its signing key")
        try:
            return jwt.decode(
                token, key.key, algorithms=[alg], audience=self.policy.audience, issuer=self.policy.issuer,
                leeway=self.policy.leeway_seconds,
                options={"require": ["exp", "iat", "iss", "sub", "aud"], "verify_iat": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("the token has expired; get a new one") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("the token is not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("the token is for another audience than MedBridge") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("the token is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"the token has no {exc.claim} claim") from None
        except jwt.PyJWTError:
            raise AuthenticationError("the token's signature or claims are invalid") from None
