"""A real OpenID provider (npm oidc-provider, tests/oidc_provider/server.mjs) and app helpers for the
access-control tests."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.testclient import TestClient

from integration.app.http import create_app
from integration.app.services import Services
from integration.db.store import Store
from tests.conftest import REPO, free_port, stack_settings

PROVIDER_DIR = REPO / "tests" / "oidc_provider"
AUDIENCE = "medbridge"
# the provider's clients: systems with SMART scopes, some with a MedBridge role claim as well
CLIENTS = [
    {"client_id": "pacs", "scope": "system/*.cruds", "roles": []},
    {"client_id": "ops", "scope": "system/*.rs", "roles": ["admin"]},
    {"client_id": "ward", "scope": "user/*.rs medbridge.review", "roles": []},
    {"client_id": "lab", "scope": "system/Patient.rs system/Observation.cu", "roles": []},
]


def signing_key(kid: str) -> dict[str, Any]:
    """A private EC P-256 JWK (the provider signs with it; tests forge with it)."""
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1())))
    return {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}


@dataclass
class OidcProvider:
    folder: Path
    port: int = field(default_factory=free_port)
    keys: list[dict[str, Any]] = field(default_factory=lambda: [signing_key("key-1")])
    proc: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def secret(self, client_id: str) -> str:
        return f"{client_id}-secret-that-is-long-enough-for-the-provider"

    def start(self) -> None:
        config = {"port": self.port, "audience": AUDIENCE, "keys": self.keys,
                  "clients": [{**c, "client_secret": self.secret(c["client_id"])} for c in CLIENTS]}
        path = self.folder / "provider.json"
        path.write_text(json.dumps(config))
        log = (self.folder / "provider.log").open("ab")
        self.proc = subprocess.Popen(["node", str(PROVIDER_DIR / "server.mjs"), str(path)], stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "provider.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the OpenID provider did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def rotate(self, kid: str) -> None:
        """A new signing key, published beside the old one (tokens signed before stay valid)."""
        self.stop()
        self.keys = [signing_key(kid), *self.keys]
        self.start()

    def token(self, client_id: str, scope: str | None = None) -> str:
        """A client-credentials access token, over HTTP, as a PACS or EHR would get one."""
        client = next(c for c in CLIENTS if c["client_id"] == client_id)
        response = httpx.post(f"{self.issuer}/token", data={
            "grant_type": "client_credentials", "client_id": client_id, "client_secret": self.secret(client_id),
            "scope": scope or client["scope"]}, timeout=10)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


@pytest.fixture
def oidc(tmp_path: Path) -> Iterator[OidcProvider]:
    provider = OidcProvider(tmp_path)
    provider.start()
    yield provider
    provider.stop()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.start()
    yield store
    store.stop()


def in_process(store: Store, tmp_path: Path, **settings: object) -> TestClient:
    """The HTTP app in this process (no socket): for the many-request tests. Host 127.0.0.1, no token."""
    app = create_app(Services(stack_settings(tmp_path, fhir_validation_workers=0, **settings), store))
    return TestClient(app, base_url="http://127.0.0.1")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_outcome(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["diagnostics"]
    return body
