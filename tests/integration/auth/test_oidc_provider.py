"""MedBridge validating tokens of a real OpenID provider (oidc-provider, Node) through its discovery
document and JWKS: client-credentials tokens accepted, scopes and roles honoured, keys rotated, forged
and stale tokens refused with 401, an unreachable issuer answered with 503."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from integration.db.store import Store
from tests.conftest import serve_app, stack_settings
from tests.integration.auth.conftest import AUDIENCE, OidcProvider, assert_outcome, bearer, signing_key

PATIENT = {"resourceType": "Patient", "gender": "female"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def medbridge(oidc: OidcProvider, sqlite_store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    """MedBridge pointed at the provider (no refresh rate limit, so each unknown kid asks it again)."""
    settings = stack_settings(tmp_path, oidc_issuer=oidc.issuer, oidc_audience=AUDIENCE, oidc_jwks_refresh_seconds=0)
    with serve_app(settings, sqlite_store) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                                 timeout=30) as client:
        yield client


def forge(key: dict[str, Any], **claims: Any) -> str:
    """A token signed with ``key`` (the provider's own key, or another), with claims overridden."""
    now = int(time.time())
    body = {"iss": claims.pop("iss", None), "aud": AUDIENCE, "sub": "pacs", "iat": now, "exp": now + 300,
            "scope": "system/*.cruds", **claims}
    private = jwt.PyJWK(key).key
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private, algorithm="ES256",
                      headers={"kid": key["kid"]})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_client_credentials_token_is_accepted_and_names_the_client(oidc: OidcProvider, medbridge: httpx.Client
                                                                     ) -> None:
    token = oidc.token("pacs")
    created = medbridge.post("/fhir/Patient", json=PATIENT, headers={**bearer(token), **FHIR_JSON})
    assert created.status_code == 201
    assert medbridge.get(f"/fhir/Patient/{created.json()['id']}", headers=bearer(token)).status_code == 200
    me = medbridge.get("/auth/me", headers=bearer(token)).json()
    assert (me["sub"], me["client_id"], me["issuer"]) == ("pacs", "pacs", oidc.issuer)
    assert me["remote_address"] == "127.0.0.1" and "system/*.cruds" in me["scopes"]


def test_scopes_and_roles_from_the_provider_decide_what_a_token_may_do(oidc: OidcProvider, medbridge: httpx.Client
                                                                       ) -> None:
    ops, ward, lab = oidc.token("ops"), oidc.token("ward"), oidc.token("lab")
    assert medbridge.get("/api/dead-letters", headers=bearer(ops)).status_code == 200  # role claim: admin
    assert_outcome(medbridge.post("/fhir/Patient", json=PATIENT, headers={**bearer(ops), **FHIR_JSON}), 403)
    assert medbridge.get("/api/reports", headers=bearer(ward)).status_code == 200  # user/*.rs
    assert_outcome(medbridge.get("/api/dead-letters", headers=bearer(ward)), 403)
    # lab: system/Patient.rs system/Observation.cu
    assert medbridge.get("/fhir/Patient", headers=bearer(lab)).status_code == 200
    assert_outcome(medbridge.get("/fhir/Observation", headers=bearer(lab)), 403)
    refused = medbridge.post("/fhir/Patient", json=PATIENT, headers={**bearer(lab), **FHIR_JSON})
    assert_outcome(refused, 403)
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    assert "system/Patient.c" in refused.headers["www-authenticate"]
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "glucose"}}
    created = medbridge.post("/fhir/Observation", json=observation, headers={**bearer(lab), **FHIR_JSON})
    assert created.status_code == 201
    # a transaction needs, entry by entry, what each interaction alone would
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": observation},
        {"request": {"method": "POST", "url": "Patient"}, "resource": PATIENT}]}
    assert_outcome(medbridge.post("/fhir", json=bundle, headers={**bearer(lab), **FHIR_JSON}), 403)
    assert medbridge.post("/fhir", json=bundle, headers={**bearer(oidc.token("pacs")), **FHIR_JSON}).status_code == 200


def test_a_rotated_key_is_fetched_on_its_first_token_and_the_old_one_still_works(
        oidc: OidcProvider, medbridge: httpx.Client) -> None:
    before = oidc.token("pacs")
    assert medbridge.get("/fhir/Patient", headers=bearer(before)).status_code == 200
    oidc.rotate("key-2")
    after = oidc.token("pacs")
    assert jwt.get_unverified_header(after)["kid"] == "key-2"
    assert medbridge.get("/fhir/Patient", headers=bearer(after)).status_code == 200
    assert medbridge.get("/fhir/Patient", headers=bearer(before)).status_code == 200


def test_an_unreachable_issuer_gives_503_for_a_new_key_never_an_open_door(oidc: OidcProvider, medbridge: httpx.Client
                                                                          ) -> None:
    known = oidc.token("pacs")
    assert medbridge.get("/fhir/Patient", headers=bearer(known)).status_code == 200
    oidc.stop()
    unknown_kid = forge(signing_key("key-new"), iss=oidc.issuer)
    refused = medbridge.get("/fhir/Patient", headers=bearer(unknown_kid))
    assert_outcome(refused, 503)
    assert refused.headers["retry-after"]
    assert medbridge.get("/fhir/Patient", headers=bearer(known)).status_code == 200  # its key is held


def test_forged_stale_and_misdirected_tokens_are_refused_with_401(oidc: OidcProvider, medbridge: httpx.Client) -> None:
    key, now = oidc.keys[0], int(time.time())
    public_pem = jwt.PyJWK(key).key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    claims = {"iss": oidc.issuer, "aud": AUDIENCE, "sub": "pacs", "iat": now, "exp": now + 300,
              "scope": "system/*.cruds"}
    payload = _b64(json.dumps(claims).encode())
    unsigned = f"{_b64(json.dumps({'alg': 'none', 'kid': key['kid']}).encode())}.{payload}."
    # the classic confusion attack: the published public key used as an HMAC secret
    hs_input = f"{_b64(json.dumps({'alg': 'HS256', 'kid': key['kid']}).encode())}.{payload}"
    hs256 = f"{hs_input}.{_b64(hmac.new(public_pem, hs_input.encode(), hashlib.sha256).digest())}"
    bad = {
        "expired": forge(key, iss=oidc.issuer, iat=now - 4000, exp=now - 3600),
        "not yet valid": forge(key, iss=oidc.issuer, nbf=now + 3600),
        "issued in the future": forge(key, iss=oidc.issuer, iat=now + 3600),
        "wrong audience": forge(key, iss=oidc.issuer, aud="some-other-api"),
        "wrong issuer": forge(key, iss="http://127.0.0.1:1/elsewhere"),
        "no subject": forge(key, iss=oidc.issuer, sub=None),
        "alg none": unsigned,
        "HS256 keyed with the public key": hs256,
        "unknown kid": forge(signing_key("not-published"), iss=oidc.issuer),
        "right kid, other key": forge({**signing_key("x"), "kid": key["kid"]}, iss=oidc.issuer),
        "truncated signature": oidc.token("pacs")[:-10],
    }
    for what, token in bad.items():
        response = medbridge.get("/fhir/Patient", headers=bearer(token))
        assert_outcome(response, 401)
        assert 'error="invalid_token"' in response.headers["www-authenticate"], what
