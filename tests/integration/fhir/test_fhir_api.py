"""The FHIR edge over HTTP: interactions, validation and OperationOutcomes."""

from __future__ import annotations

import json

import httpx
from carebundle import generate_bundle, to_json
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import select

from integration.db.store import Store
from integration.db.tables import ChangeTracker
from tests import authorized

OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}], "text": "Haemoglobin"},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {"value": 10.9, "unit": "g/dL"},
}


def test_create_read_update_with_versions_and_etags(fhir_client: httpx.Client) -> None:
    created = fhir_client.post("/fhir/Observation", json=OBSERVATION)
    assert created.status_code == 201
    body = created.json()
    assert created.headers["content-type"].startswith("application/fhir+json")
    assert created.headers["location"] == f"Observation/{body['id']}/_history/1"
    assert created.headers["etag"] == 'W/"1"'
    read = fhir_client.get(f"/fhir/Observation/{body['id']}")
    assert read.status_code == 200 and read.json()["valueQuantity"]["value"] == 10.9
    changed = {**body, "valueQuantity": {"value": 11.2, "unit": "g/dL"}}
    updated = fhir_client.put(f"/fhir/Observation/{body['id']}", json=changed, headers={"If-Match": 'W/"1"'})
    assert updated.status_code == 200 and updated.json()["meta"]["versionId"] == "2"
    stale = fhir_client.put(f"/fhir/Observation/{body['id']}", json=changed, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"


def test_invalid_content_is_422_naming_the_element(fhir_client: httpx.Client) -> None:
    bad = {**OBSERVATION, "valueQuantity": {"value": "lots"}}
    r = fhir_client.post("/fhir/Observation", json=bad)
    assert r.status_code == 422
    issue = r.json()["issue"][0]
    assert issue["severity"] == "error" and issue["expression"] == ["Observation.valueQuantity.value"]
    r = fhir_client.post("/fhir/Observation", json={**OBSERVATION, "status": "not-a-status"})
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["Observation.status"]


def test_unknown_type_mismatch_bad_json_and_oversize_are_4xx_outcomes(fhir_client: httpx.Client) -> None:
    assert fhir_client.post("/fhir/Spaceship", json={"resourceType": "Spaceship"}).status_code == 404
    assert fhir_client.post("/fhir/Quantity", json={"resourceType": "Quantity"}).status_code == 404  # a data type
    assert fhir_client.get("/fhir/Quantity").status_code == 404
    mismatch = fhir_client.post("/fhir/Condition", json=OBSERVATION)
    assert mismatch.status_code == 400 and mismatch.json()["issue"][0]["expression"] == ["resourceType"]
    assert fhir_client.post("/fhir/Observation", content=b"{not json").status_code == 400
    huge = {**OBSERVATION, "note": [{"text": "x" * 300_000}]}
    assert fhir_client.post("/fhir/Observation", json=huge).status_code == 413
    assert fhir_client.get("/fhir/Observation/nope").status_code == 404
    strict = fhir_client.get("/fhir/Observation", params={"code:bogus": "1"}, headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400 and "not supported" in strict.json()["issue"][0]["diagnostics"]
    lenient = fhir_client.get("/fhir/Observation", params={"code:bogus": "1"}).json()
    (outcome,) = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome["resource"]["issue"][0]["expression"] == ["code:bogus"]


def test_a_resource_nested_too_deeply_to_validate_is_a_422_in_a_resource_and_in_a_bundle(
    fhir_client: httpx.Client,
) -> None:
    """Nested extensions deep enough to exhaust the validators' recursion (yet within what the JSON
    parser takes) are refused like other invalid content, never a 500."""
    levels = 350  # two JSON levels each (object, array): ~700 deep, where the validators' recursion ends
    extension = '{"url": "http://example.org/nested", "extension": [' * levels
    extension += '{"url": "http://example.org/leaf", "valueString": "x"}' + "]}" * levels
    deep = json.dumps(OBSERVATION)[:-1] + ', "extension": [' + extension + "]}"
    headers = {"Content-Type": "application/fhir+json"}
    r = fhir_client.post("/fhir/Observation", content=deep, headers=headers)
    assert r.status_code == 422 and r.json()["resourceType"] == "OperationOutcome"
    bundle = ('{"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": ' + deep
              + ', "request": {"method": "POST", "url": "Observation"}}]}')
    r = fhir_client.post("/fhir", content=bundle, headers=headers)
    assert 400 <= r.status_code < 500 and r.json()["resourceType"] == "OperationOutcome"


def test_search_by_subject_status_and_paging(fhir_client: httpx.Client) -> None:
    for i in range(5):
        r = fhir_client.post("/fhir/Observation", json={**OBSERVATION, "valueQuantity": {"value": i}})
        assert r.status_code == 201
    fhir_client.post("/fhir/Observation", json={**OBSERVATION, "subject": {"reference": "Patient/other"}})
    page = fhir_client.get("/fhir/Observation", params={"subject": "Patient/p1", "_count": 2}).json()
    assert page["type"] == "searchset" and page["total"] == 5 and len(page["entry"]) == 2
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    page2 = authorized.get(nxt).json()
    assert len(page2["entry"]) == 2
    assert not {e["resource"]["id"] for e in page["entry"]} & {e["resource"]["id"] for e in page2["entry"]}
    by_patient = fhir_client.get("/fhir/Observation", params={"patient": "other"}).json()
    assert by_patient["total"] == 1
    assert fhir_client.get("/fhir/Observation", params={"status": "amended"}).json()["total"] == 0


def test_transaction_resolves_urn_uuid_references_and_marks_the_patient_changed(
    fhir_client: httpx.Client, store: Store
) -> None:
    bundle = json.loads(to_json(generate_bundle(profile="type2_diabetes", seed=42)))  # US Core R4, 50 entries
    r = fhir_client.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "transaction-response" and len(out["entry"]) == len(bundle["entry"])
    assert all(e["response"]["status"] == "201 Created" for e in out["entry"])
    patient_ref = next(e["response"]["location"] for e in out["entry"] if e["fullUrl"].startswith("Patient/"))
    patient_ref = patient_ref.split("/_history")[0]
    conditions = fhir_client.get("/fhir/Condition", params={"subject": patient_ref}).json()
    sent = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition")
    assert sent and conditions["total"] == len(conditions["entry"]) == sent  # every Condition of the Bundle, no other
    assert {e["resource"]["subject"]["reference"] for e in conditions["entry"]} == {patient_ref}
    with store.session() as s:
        trackers = list(s.scalars(select(ChangeTracker).where(ChangeTracker.kind == "patient")))
    assert [t.key for t in trackers] == [patient_ref]


def test_transaction_is_all_or_nothing(fhir_client: httpx.Client) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:1", "request": {"method": "POST", "url": "Observation"}, "resource": OBSERVATION},
            {"fullUrl": "urn:uuid:2", "request": {"method": "POST", "url": "Observation"},
             "resource": {**OBSERVATION, "status": "bogus"}},
        ],
    }
    r = fhir_client.post("/fhir", json=bundle)
    assert r.status_code == 422
    assert r.json()["issue"][0]["expression"] == ["Bundle.entry[1].resource.status"]
    assert fhir_client.get("/fhir/Observation").json()["total"] == 0


def test_batch_keeps_good_entries_and_reports_bad_ones(fhir_client: httpx.Client) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "POST", "url": "Observation"}, "resource": OBSERVATION},
            {"request": {"method": "POST", "url": "Observation"}, "resource": {**OBSERVATION, "status": "bogus"}},
        ],
    }
    r = fhir_client.post("/fhir", json=bundle)
    assert r.status_code == 200
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses[0] == "201 Created" and statuses[1] == "422"
    assert fhir_client.get("/fhir/Observation").json()["total"] == 1


def test_capability_statement_is_valid(fhir_client: httpx.Client) -> None:
    r = fhir_client.get("/fhir/metadata")
    assert r.status_code == 200
    get_fhir_model_class("CapabilityStatement").model_validate(r.json())
    assert r.json()["fhirVersion"] == "4.0.1"


def test_vread_history_and_delete(fhir_client: httpx.Client) -> None:
    rid = fhir_client.post("/fhir/Observation", json=OBSERVATION).json()["id"]
    v1 = fhir_client.get(f"/fhir/Observation/{rid}").json()
    fhir_client.put(f"/fhir/Observation/{rid}", json={**v1, "status": "amended"})
    assert fhir_client.get(f"/fhir/Observation/{rid}/_history/1").json()["status"] == "final"
    assert fhir_client.get(f"/fhir/Observation/{rid}/_history/2").json()["status"] == "amended"
    assert fhir_client.get(f"/fhir/Observation/{rid}/_history/9").status_code == 404
    deleted = fhir_client.delete(f"/fhir/Observation/{rid}")
    assert deleted.status_code == 204 and deleted.headers["etag"] == 'W/"3"'
    gone = fhir_client.get(f"/fhir/Observation/{rid}")
    assert gone.status_code == 410 and gone.json()["issue"][0]["code"] == "deleted"
    assert fhir_client.get("/fhir/Observation", params={"_id": rid}).json()["total"] == 0
    history = fhir_client.get(f"/fhir/Observation/{rid}/_history").json()
    assert history["type"] == "history"
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert "resource" not in history["entry"][0] and history["entry"][0]["request"]["method"] == "DELETE"
    assert fhir_client.delete(f"/fhir/Observation/{rid}").status_code == 204  # idempotent


def test_conditional_create_twice_gives_one_resource(fhir_client: httpx.Client) -> None:
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "12345"}]}
    headers = {"If-None-Exist": "identifier=urn:mrn|12345"}
    first = fhir_client.post("/fhir/Patient", json=patient, headers=headers)
    second = fhir_client.post("/fhir/Patient", json=patient, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert fhir_client.get("/fhir/Patient", params={"identifier": "urn:mrn|12345"}).json()["total"] == 1
    bad = fhir_client.post("/fhir/Patient", json=patient, headers={"If-None-Exist": "telecom=x"})
    assert bad.status_code == 400
    in_url = fhir_client.post("/fhir/Patient?identifier=urn:mrn|12345", json=patient)  # criteria as the query
    assert in_url.status_code == 200 and in_url.json()["id"] == first.json()["id"]
    bad_url = fhir_client.post("/fhir/Patient?telecom=x", json=patient)
    assert bad_url.status_code == 400 and bad_url.json()["issue"][0]["expression"] == ["url"]


def test_prefer_return_minimal_and_operation_outcome(fhir_client: httpx.Client) -> None:
    minimal = fhir_client.post("/fhir/Observation", json=OBSERVATION, headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b"" and minimal.headers["location"]
    outcome = fhir_client.post("/fhir/Observation", json=OBSERVATION, headers={"Prefer": "return=OperationOutcome"})
    assert outcome.status_code == 201 and outcome.json()["resourceType"] == "OperationOutcome"


def test_a_request_waiting_on_the_database_holds_no_other_request_up(fhir_client: httpx.Client, store: Store) -> None:
    """A PUT that waits for a lock another database client holds must not stop the server answering a
    read meanwhile: the routes' store work runs off the event loop (which this process shares with
    the broker's consumers and the outbox relay)."""
    import sqlite3
    import threading
    import time

    patient = {"resourceType": "Patient", "id": "waiting", "gender": "male"}
    assert fhir_client.put("/fhir/Patient/waiting", content=json.dumps(patient)).status_code == 201
    if store.engine.dialect.name == "sqlite":
        locker = sqlite3.connect(str(store.engine.url.database), isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # the write lock: readers go on (WAL), writers wait
    else:
        import psycopg

        locker = psycopg.connect(store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False))
        locker.execute("LOCK TABLE fhir_resources IN EXCLUSIVE MODE")  # plain SELECTs still go on
    answers: list[int] = []
    writer = threading.Thread(target=lambda: answers.append(fhir_client.put(
        "/fhir/Patient/waiting", content=json.dumps({**patient, "gender": "female"})).status_code))
    try:
        writer.start()
        time.sleep(0.5)
        assert writer.is_alive(), "the PUT waits for the lock"
        t0 = time.monotonic()
        read = fhir_client.get("/fhir/Patient/waiting", timeout=5)
        assert read.status_code == 200 and read.json()["gender"] == "male"
        assert time.monotonic() - t0 < 2, "the read was answered while the PUT waited"
        assert writer.is_alive()
    finally:
        locker.rollback()
        locker.close()
        writer.join(30)
    assert answers == [200]
    assert fhir_client.get("/fhir/Patient/waiting").json()["gender"] == "female"
