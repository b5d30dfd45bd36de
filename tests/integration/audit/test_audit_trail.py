"""The audit trail over real HTTP: one IHE BALP AuditEvent per FHIR, DICOMweb and refused request, with
who (the authenticated agent and address), what (resource, patient, query) and the outcome, searchable at
GET /fhir/AuditEvent; and nothing of it when MEDBRIDGE_AUDIT is false."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from integration.audit.events import FHIR_READ
from integration.audit.trail import audit_login, audit_refusal
from integration.db.store import Store
from integration.db.tables import FhirResource
from integration.fhir.resources import validate_resource
from integration.identity import Actor
from tests import authorized
from tests.conftest import serve_app, stack_settings
from tests.integration.reports.test_review import as_identity

FHIR = {"Content-Type": "application/fhir+json"}
PATIENT = {"resourceType": "Patient", "name": [{"family": "Auditee", "given": ["Rosa"]}],
           "identifier": [{"system": "urn:mrn", "value": "MRN-4411"}]}


def client_for(port: int) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, event_hooks={"request": [as_identity]},
                        headers={"x-test-sub": "svc-ehr", "x-test-name": "EHR feed"})


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    with serve_app(stack_settings(tmp_path, min_free_bytes=0), store) as port, \
            client_for(port) as client:
        yield client


def events(api: httpx.Client, **params: str) -> list[dict[str, Any]]:
    bundle = api.get("/fhir/AuditEvent", params={"_count": "200", **params}).json()
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "AuditEvent"]


def settled(store: Store, at_least: int) -> None:
    """Wait until ``at_least`` AuditEvents are stored: a read's is written just after its answer is sent."""
    deadline = time.monotonic() + 15
    while True:
        with store.session() as s:
            count = s.scalar(select(func.count()).select_from(FhirResource)
                             .where(FhirResource.resource_type == "AuditEvent")) or 0
        if count >= at_least:
            return
        assert time.monotonic() < deadline, f"{count} of {at_least} AuditEvents stored"
        time.sleep(0.05)


def subtype(event: dict[str, Any]) -> str:
    return event["subtype"][0]["code"]


def test_a_create_read_and_search_each_leave_one_audit_event_with_who_what_and_outcome(
    api: httpx.Client, store: Store
) -> None:
    created = api.post("/fhir/Patient", json=PATIENT, headers=FHIR).json()
    pid = created["id"]
    assert api.get(f"/fhir/Patient/{pid}").status_code == 200
    assert api.get("/fhir/Observation", params={"patient": pid, "code": "8867-4"}).status_code == 200
    settled(store, 3)
    about = events(api, patient=f"Patient/{pid}")
    assert sorted(subtype(e) for e in about) == ["create", "read", "search-type"]
    for event in about:
        validate_resource(event)  # valid FHIR R4 (R4B models)
        assert event["outcome"] == "0"
        user = event["agent"][0]
        assert user["requestor"] is True and user["altId"] == "svc-ehr" and user["name"] == "EHR feed"
        assert user["network"] == {"address": "127.0.0.1", "type": "2"}
        assert event["agent"][1]["who"]["identifier"]["value"] == "viewer"  # the client application
        assert event["source"]["observer"]["display"] == "MedBridge"
    create = next(e for e in about if subtype(e) == "create")
    assert create["action"] == "C"
    assert {"reference": f"Patient/{pid}/_history/1"} in [x.get("what") for x in create["entity"]]
    search = next(e for e in about if subtype(e) == "search-type")
    assert search["action"] == "E"
    query = next(x for x in search["entity"] if "query" in x)
    assert base64.b64decode(query["query"]).decode() == f"patient={pid}&code=8867-4"
    assert query["role"]["code"] == "24"
    # the patient's data is not in the AuditEvents' own text, only references and the encoded query
    assert "Auditee" not in str(about) and "MRN-4411" not in str(about)


def test_a_refused_request_is_audited_as_a_minor_failure(api: httpx.Client) -> None:
    assert api.get("/fhir/Patient/nobody").status_code == 404
    assert api.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "x"}, headers=FHIR).status_code == 422
    failed = events(api, outcome="4")
    assert {(subtype(e), e["outcomeDesc"]) for e in failed} == {
        ("read", "404: ResourceNotFoundError"), ("create", "422: InvalidResourceError")}
    read = next(e for e in failed if subtype(e) == "read")
    assert read["entity"][0]["what"] == {"reference": "Patient/nobody"}


def test_reading_the_audit_trail_is_one_audit_event_per_request_not_a_cascade(
    api: httpx.Client, store: Store
) -> None:
    api.post("/fhir/Patient", json=PATIENT, headers=FHIR)
    assert len(events(api)) == 1  # the create's (written with it)
    settled(store, 2)
    assert len(events(api)) == 2  # and the first listing's own event, nothing more
    settled(store, 3)
    time.sleep(0.3)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(FhirResource)
                        .where(FhirResource.resource_type == "AuditEvent")) == 3


def test_a_transaction_is_one_audit_event_written_with_its_entries(api: httpx.Client, store: Store) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{i}", "resource": {**PATIENT, "name": [{"family": f"F{i}"}]},
         "request": {"method": "POST", "url": "Patient"}} for i in range(5)]}
    assert api.post("/fhir", json=bundle, headers=FHIR).status_code == 200
    (event,) = events(api, subtype="transaction")
    assert event["entity"][0]["description"] == "transaction Bundle of 5 entries" and event["outcome"] == "0"
    # a refused transaction keeps nothing of its entries, and its AuditEvent says it failed
    bad = {**bundle, "entry": [*bundle["entry"], {"resource": {"resourceType": "Patient", "gender": "x"},
                                                  "request": {"method": "POST", "url": "Patient"}}]}
    assert api.post("/fhir", json=bad, headers=FHIR).status_code == 422
    assert [e["outcome"] for e in events(api, subtype="transaction", _sort="date")] == ["0", "4"]


def test_dicomweb_requests_are_audited_per_request_with_the_study(api: httpx.Client, store: Store) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    boundary = "audit-test"
    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = head + raw + f"\r\n--{boundary}--\r\n".encode()
    kind = f'multipart/related; type="application/dicom"; boundary={boundary}'
    r = api.post("/dicomweb/studies", content=body, headers={"Content-Type": kind})
    assert r.status_code == 200
    assert api.get("/dicomweb/studies", params={"PatientName": "Compressed*"}).status_code == 200
    assert api.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/metadata").status_code == 200
    settled(store, 3)
    kinds = {e["type"]["code"]: e for e in events(api, type="http://dicom.nema.org/resources/ontology/DCM|110104,"
                                                             "http://dicom.nema.org/resources/ontology/DCM|110112,"
                                                             "http://dicom.nema.org/resources/ontology/DCM|110103")}
    assert set(kinds) == {"110104", "110112", "110103"}
    study = {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{ds.StudyInstanceUID}"}}
    assert kinds["110103"]["entity"][0]["what"] == study and kinds["110103"]["action"] == "R"
    assert base64.b64decode(kinds["110112"]["entity"][0]["query"]) == b"PatientName=Compressed%2A"


def test_audit_refusal_records_a_failed_login_or_a_forbidden_interaction(api: httpx.Client, store: Store) -> None:
    intruder = Actor(sub="unknown", address="10.1.2.3")
    audit_refusal(store, intruder, 401, "token expired")
    audit_refusal(store, Actor(sub="u-7", name="Nurse", roles=frozenset({"integration"})), 403,
                  "needs role reviewer", FHIR_READ)
    audit_login(store, Actor(sub="u-8", name="Dr Lee", address="10.1.2.4"))
    login = events(api, subtype="http://dicom.nema.org/resources/ontology/DCM|110122", _sort="date")
    assert [(e["outcome"], e.get("outcomeDesc"), e["agent"][0]["network"]["address"]) for e in login] == [
        ("4", "401: token expired", "10.1.2.3"), ("0", None, "10.1.2.4")]
    forbidden = events(api, altid="u-7")
    assert [(subtype(e), e["outcome"], e["outcomeDesc"]) for e in forbidden] == [
        ("read", "4", "403: needs role reviewer")]


def test_with_audit_off_nothing_is_recorded(store: Store, tmp_path: Path) -> None:
    with serve_app(stack_settings(tmp_path, audit_enabled=False), store) as port, \
            client_for(port) as client:
        pid = client.post("/fhir/Patient", json=PATIENT, headers=FHIR).json()["id"]
        assert client.get(f"/fhir/Patient/{pid}").status_code == 200
        assert "entry" not in client.get("/fhir/AuditEvent").json()


def test_refused_tokens_and_roles_and_password_logins_are_audited_through_the_auth_layer(
    api: httpx.Client, store: Store
) -> None:
    from integration.auth.users import add_user

    base = str(api.base_url)
    forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWxsb3J5In0."  # alg none, sub mallory
    assert httpx.get(f"{base}/fhir/Patient", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    assert httpx.get(f"{base}/fhir/Patient").status_code == 401
    reviewer = {"Authorization": f"Bearer {authorized.issuer().mint(subject='rev-1', roles=['reviewer'])}"}
    assert httpx.post(f"{base}/fhir/Patient", json=PATIENT, headers={**reviewer, **FHIR}).status_code == 403
    add_user(store, "dr-audit", "correct horse", ["reviewer"])
    login = f"{base}/auth/token"
    assert httpx.post(login, data={"username": "dr-audit", "password": "wrong"}).status_code == 400
    assert httpx.post(login, data={"username": "dr-audit", "password": "correct horse"}).status_code == 200
    settled(store, 5)
    refused = events(api, outcome="4")
    descriptions = sorted(e["outcomeDesc"].split(":")[0] for e in refused)
    assert descriptions == ["401", "401", "401", "403"], [e["outcomeDesc"] for e in refused]
    assert any(e.get("agent", [{}])[0].get("altId") == "rev-1" for e in refused)  # who was refused
    assert not any("correct horse" in str(e) or "mallory" in str(e) for e in refused)  # no secret, no claim
    logins = [e for e in events(api, outcome="0") if e["subtype"][0]["code"] == "110122"]
    assert [e["agent"][0].get("altId") for e in logins] == ["dr-audit"]


def test_the_trail_is_read_by_admins_only_and_written_by_nobody_through_the_api(api: httpx.Client) -> None:
    base = str(api.base_url)
    event = events(api) or [{"resourceType": "AuditEvent"}]

    def as_role(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {authorized.token(role)}"}

    assert httpx.get(f"{base}/fhir/AuditEvent", headers=as_role("reviewer")).status_code == 403
    assert httpx.get(f"{base}/fhir/AuditEvent", headers=as_role("integration")).status_code == 403
    assert httpx.get(f"{base}/fhir/AuditEvent", headers=as_role("admin")).status_code == 200
    forged = {**event[0], "id": "forged"}
    for role in ("integration", "admin"):
        assert httpx.put(f"{base}/fhir/AuditEvent/forged", json=forged,
                         headers={**as_role(role), **FHIR}).status_code == 403
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": forged, "request": {"method": "POST", "url": "AuditEvent"}}]}
        assert httpx.post(f"{base}/fhir", json=bundle, headers={**as_role(role), **FHIR}).status_code == 403
