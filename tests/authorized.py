"""HTTP calls to MedBridge with a bearer token, for tests about something else than access control.

Every test server (``tests.conftest.stack_settings``) signs with one embedded-issuer key per session, so
one token, holding every role, works against all of them. ``authorized.get(...)`` and friends are
``httpx.get(...)`` with that token added unless the call sets its own Authorization header.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

from integration.auth.embedded import EmbeddedIssuer
from integration.auth.principal import ROLES

_issuer_key: list[Path] = []


def use_issuer_key(path: Path) -> None:
    """Set by the session fixture in tests/conftest.py before any server starts."""
    _issuer_key[:] = [path]
    token.cache_clear()


def issuer_key() -> Path:
    assert _issuer_key, "tests.conftest's session fixture sets the test issuer key"
    return _issuer_key[0]


def issuer() -> EmbeddedIssuer:
    return EmbeddedIssuer(issuer_key())


@lru_cache
def token(*roles: str, name: str = "pytest") -> str:
    """A day-long token from the test issuer holding ``roles`` (every role when none are named)."""
    return issuer().mint(subject=name, roles=list(roles or ROLES), name=name, ttl_seconds=86400)


def headers(*roles: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(*roles)}"}


def _with_token(kwargs: dict[str, Any]) -> dict[str, Any]:
    merged = httpx.Headers(kwargs.pop("headers", None) or {})
    merged.setdefault("Authorization", f"Bearer {token()}")
    return {**kwargs, "headers": merged}


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, **_with_token(kwargs))


def post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, **_with_token(kwargs))


def put(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.put(url, **_with_token(kwargs))


def delete(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.delete(url, **_with_token(kwargs))


def Client(**kwargs: Any) -> httpx.Client:  # noqa: N802 - stands in for httpx.Client
    return httpx.Client(**_with_token(kwargs))


def AsyncClient(**kwargs: Any) -> httpx.AsyncClient:  # noqa: N802 - stands in for httpx.AsyncClient
    return httpx.AsyncClient(**_with_token(kwargs))
