"""Where signing keys come from: an issuer's discovery document and JWKS, cached by ``kid``.

Both identity modes go through :class:`KeyCache`: a hospital's OpenID provider over HTTP
(:class:`RemoteIssuer`) and MedBridge's own embedded issuer (:class:`integration.auth.embedded.EmbeddedIssuer`,
which serves the same two documents at ``/auth/...`` and hands them to the cache in-process, since a server
cannot wait on its own HTTP port while answering a request).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import httpx
import jwt

from integration.auth.errors import IssuerUnavailableError

log = logging.getLogger(__name__)


class KeySource(Protocol):
    issuer: str

    def discovery(self) -> dict[str, Any]:
        """The OpenID Connect discovery document (``issuer``, ``jwks_uri``, ...)."""
        ...

    def jwks(self, jwks_uri: str) -> dict[str, Any]:
        """The JSON Web Key Set at ``jwks_uri``."""
        ...


class RemoteIssuer:
    """An OpenID provider reached over HTTP: ``{issuer}/.well-known/openid-configuration`` → ``jwks_uri``."""

    def __init__(self, issuer: str, timeout_seconds: float = 5.0) -> None:
        self.issuer = issuer.rstrip("/")
        self.timeout = timeout_seconds

    def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = httpx.get(url, timeout=self.timeout, follow_redirects=False)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise IssuerUnavailableError(f"the identity provider did not answer {url} ({type(exc).__name__}); "
                                         f"retry later, or check MEDBRIDGE_OIDC_ISSUER") from None
        if not isinstance(body, dict):
            raise IssuerUnavailableError(f"{url} did not return a JSON object")
        return body

    def discovery(self) -> dict[str, Any]:
        return self._get_json(f"{self.issuer}/.well-known/openid-configuration")

    def jwks(self, jwks_uri: str) -> dict[str, Any]:
        return self._get_json(jwks_uri)


class KeyCache:
    """Verification keys by ``kid``, fetched from ``source`` when a token names one not held.

    Fetches are rate-limited to one per ``min_refresh_seconds`` (a stream of tokens with made-up kids
    cannot make MedBridge hammer the IdP); a token whose key is still unknown after that is refused.
    When the issuer cannot be reached and the key is not held, :class:`IssuerUnavailableError` (503).
    """

    def __init__(self, source: KeySource, min_refresh_seconds: float = 10.0) -> None:
        self.source = source
        self.min_refresh_seconds = min_refresh_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_fetch = float("-inf")
        self._last_failure: str | None = None  # why the last fetch failed, while it is the latest
        self._lock = threading.Lock()

    def cached(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)

    def fetch_for(self, kid: str) -> jwt.PyJWK | None:
        """The key ``kid``, fetching the JWKS again unless that was done within ``min_refresh_seconds``.
        Blocking (HTTP): call it off the event loop."""
        with self._lock:
            if kid in self._keys:
                return self._keys[kid]
            if time.monotonic() - self._last_fetch < self.min_refresh_seconds:
                if self._last_failure is not None:  # the issuer was just found down: not asked again yet
                    raise IssuerUnavailableError(self._last_failure)
                return None
            self._last_fetch = time.monotonic()
            try:
                self._keys = self._load()
            except IssuerUnavailableError as exc:
                self._last_failure = str(exc)
                raise
            self._last_failure = None
            return self._keys.get(kid)

    def _load(self) -> dict[str, jwt.PyJWK]:
        discovery = self.source.discovery()
        if str(discovery.get("issuer", "")).rstrip("/") != self.source.issuer.rstrip("/"):
            # OpenID Connect Discovery §4.3: a document for another issuer must not be used
            raise IssuerUnavailableError("the discovery document names another issuer; check MEDBRIDGE_OIDC_ISSUER")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise IssuerUnavailableError("the discovery document has no jwks_uri")
        keys: dict[str, jwt.PyJWK] = {}
        for jwk in self.source.jwks(jwks_uri).get("keys", []):
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or not isinstance(jwk.get("kid"), str):
                continue
            try:
                keys[jwk["kid"]] = jwt.PyJWK(jwk)
            except jwt.PyJWTError:  # a key type or curve PyJWT cannot use: tokens signed with it fail
                log.warning("skipping a JWKS key MedBridge cannot use (kid %s)", jwk["kid"])
        log.info("loaded %d signing keys from the identity provider", len(keys))
        return keys
