"""Type-level _history, conditional update, conditional transaction entries, reference targets in
transactions, required bindings, and the CapabilityStatement matching what the server does."""

from __future__ import annotations

import time
from typing import Any

import httpx
from fhir.resources.R4B import get_fhir_model_class

from tests import authorized

PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "m-1"}], "gender": "female"}


def _transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def test_type_history_pages_newest_first_and_honours_since(fhir_client: httpx.Client) -> None:
    first = fhir_client.post("/fhir/Patient", json=PATIENT).json()
    time.sleep(0.05)
    second = fhir_client.post("/fhir/Patient", json={**PATIENT, "gender": "male"}).json()
    updated = fhir_client.put(f"/fhir/Patient/{first['id']}", json={**first, "gender": "other"}).json()
    fhir_client.delete(f"/fhir/Patient/{second['id']}")
    fhir_client.post("/fhir/Observation", json={"resourceType": "Observation", "status": "final",
                                                "code": {"text": "x"}})
    history = fhir_client.get("/fhir/Patient/_history").json()
    assert history["type"] == "history" and history["total"] == 4
    seen = [(e["fullUrl"], e["request"]["method"]) for e in history["entry"]]
    assert seen == [(f"Patient/{second['id']}", "DELETE"), (f"Patient/{first['id']}", "PUT"),
                    (f"Patient/{second['id']}", "POST"), (f"Patient/{first['id']}", "POST")]
    page = fhir_client.get("/fhir/Patient/_history", params={"_count": 3}).json()
    assert len(page["entry"]) == 3
    rest = authorized.get(next(link["url"] for link in page["link"] if link["relation"] == "next")).json()
    assert [e["response"]["etag"] for e in rest["entry"]] == ['W/"1"']
    since = fhir_client.get("/fhir/Patient/_history", params={"_since": second["meta"]["lastUpdated"]}).json()
    assert since["total"] == 3
    assert updated["meta"]["versionId"] in {e["response"]["etag"].strip('W/"') for e in since["entry"]}
    bad = fhir_client.get("/fhir/Patient/_history", params={"_since": "yesterday"})
    assert bad.status_code == 400 and bad.json()["issue"][0]["expression"] == ["_since"]
    assert fhir_client.get("/fhir/Patient/_history", params={"gender": "x"}).status_code == 400


def test_conditional_update_creates_updates_or_refuses_ambiguity(fhir_client: httpx.Client) -> None:
    url = "/fhir/Patient?identifier=urn:mrn|m-1"
    created = fhir_client.put(url, json=PATIENT)
    assert created.status_code == 201
    rid = created.json()["id"]
    updated = fhir_client.put(url, json={**PATIENT, "gender": "male"})
    assert updated.status_code == 200 and updated.json()["id"] == rid and updated.json()["meta"]["versionId"] == "2"
    assert fhir_client.get(f"/fhir/Patient/{rid}").json()["gender"] == "male"
    fhir_client.post("/fhir/Patient", json=PATIENT)  # a second Patient with the same identifier
    ambiguous = fhir_client.put(url, json=PATIENT)
    assert ambiguous.status_code == 412 and ambiguous.json()["resourceType"] == "OperationOutcome"
    other = fhir_client.put(f"/fhir/Patient?_id={rid}", json={**PATIENT, "id": "someone-else"})
    assert other.status_code == 400 and other.json()["issue"][0]["expression"] == ["Patient.id"]
    unsupported = fhir_client.put("/fhir/Patient?telecom=1", json=PATIENT)
    assert unsupported.status_code == 400 and unsupported.json()["issue"][0]["expression"] == ["url"]
    assert fhir_client.put("/fhir/Patient", json=PATIENT).status_code == 400


def test_transaction_conditional_entries_create_once(fhir_client: httpx.Client) -> None:
    bundle = _transaction(
        {"fullUrl": "urn:uuid:p", "resource": PATIENT,
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|m-1"}},
        {"fullUrl": "urn:uuid:o", "request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:p"}}},
    )
    first = fhir_client.post("/fhir", json=bundle)
    second = fhir_client.post("/fhir", json=bundle)
    assert first.status_code == second.status_code == 200, second.text
    assert [e["response"]["status"] for e in first.json()["entry"]] == ["201 Created", "201 Created"]
    assert second.json()["entry"][0]["response"]["status"] == "200 OK"
    assert second.json()["entry"][0]["fullUrl"] == first.json()["entry"][0]["fullUrl"]
    assert fhir_client.get("/fhir/Patient", params={"_summary": "count"}).json()["total"] == 1
    patient_ref = first.json()["entry"][0]["fullUrl"]
    assert fhir_client.get("/fhir/Observation", params={"subject": patient_ref}).json()["total"] == 2
    conditional_put = _transaction({"resource": {**PATIENT, "gender": "male"},
                                    "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|m-1"}})
    out = fhir_client.post("/fhir", json=conditional_put).json()
    assert out["entry"][0]["response"]["status"] == "200 OK"
    assert fhir_client.get(f"/fhir/{patient_ref}").json()["gender"] == "male"


def test_transaction_refuses_references_to_missing_targets_and_writes_nothing(fhir_client: httpx.Client) -> None:
    stored = fhir_client.post("/fhir/Patient", json=PATIENT).json()["id"]
    ok = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
          "subject": {"reference": f"Patient/{stored}"}}
    dangling = {**ok, "subject": {"reference": "Patient/nobody"}}
    r = fhir_client.post("/fhir", json=_transaction(
        {"request": {"method": "POST", "url": "Observation"}, "resource": ok},
        {"request": {"method": "POST", "url": "Observation"}, "resource": dangling},
    ))
    assert r.status_code == 422
    issue = r.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[1].resource.subject.reference"]
    assert "Patient/nobody" in issue["diagnostics"]
    assert fhir_client.get("/fhir/Observation", params={"_summary": "count"}).json()["total"] == 0
    fhir_client.delete(f"/fhir/Patient/{stored}")
    gone = fhir_client.post("/fhir", json=_transaction({"request": {"method": "POST", "url": "Observation"},
                                                        "resource": ok}))
    assert gone.status_code == 422  # a deleted target is not a target
    in_bundle = fhir_client.post("/fhir", json=_transaction(
        {"request": {"method": "PUT", "url": "Patient/new-1"}, "resource": {**PATIENT, "id": "new-1"}},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {**ok, "subject": {"reference": "Patient/new-1"}}},
    ))
    assert in_bundle.status_code == 200, in_bundle.text



def test_transaction_names_unresolved_and_malformed_references_and_writes_nothing(fhir_client: httpx.Client) -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    unresolved = fhir_client.post("/fhir", json=_transaction(
        {"fullUrl": "urn:uuid:a", "request": {"method": "POST", "url": "Patient"}, "resource": PATIENT},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {**obs, "subject": {"reference": "urn:uuid:a"},
                      "performer": [{"reference": "urn:uuid:nowhere"}]}},
    ))
    assert unresolved.status_code == 400
    issue = unresolved.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[1].resource"] and "urn:uuid:nowhere" in issue["diagnostics"]
    malformed = fhir_client.post("/fhir", json=_transaction(
        {"fullUrl": "urn:uuid:a", "request": {"method": "POST", "url": "Patient"}, "resource": PATIENT},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {**obs, "subject": {"reference": "urn:uuid:a"}, "hasMember": [{"reference": "a/b/c"}]}},
    ))
    assert malformed.status_code == 422
    assert malformed.json()["issue"][0]["expression"] == ["Bundle.entry[1].resource.hasMember[0].reference"]
    assert fhir_client.get("/fhir/Patient", params={"_summary": "count"}).json()["total"] == 0
    assert fhir_client.get("/fhir/Observation", params={"_summary": "count"}).json()["total"] == 0


def test_transaction_stores_the_same_content_as_current_version_and_history(fhir_client: httpx.Client) -> None:
    patient = {**PATIENT, "name": [{"family": "Zo\u00eb", "given": ["\u00c5sa"]}]}
    out = fhir_client.post("/fhir", json=_transaction(
        {"fullUrl": "urn:uuid:p", "request": {"method": "POST", "url": "Patient"}, "resource": patient},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:p"}, "valueQuantity": {"value": 1.5}}},
    ))
    assert out.status_code == 200, out.text
    for entry in out.json()["entry"]:
        location = entry["response"]["location"]
        current = fhir_client.get("/fhir/" + location.split("/_history")[0]).json()
        assert fhir_client.get(f"/fhir/{location}").json() == current
        assert current["meta"]["versionId"] == "1"
    patient_id = out.json()["entry"][0]["response"]["location"].split("/")[1]
    stored = fhir_client.get(f"/fhir/Patient/{patient_id}").json()
    assert stored["name"] == [{"family": "Zo\u00eb", "given": ["\u00c5sa"]}]
    observation = fhir_client.get("/fhir/" + out.json()["entry"][1]["response"]["location"]).json()
    assert observation["subject"] == {"reference": f"Patient/{patient_id}"}
    assert observation["valueQuantity"] == {"value": 1.5}

BAD_BINDINGS: list[tuple[dict[str, Any], str]] = [
    ({"resourceType": "DiagnosticReport", "status": "done", "code": {"text": "x"}}, "DiagnosticReport.status"),
    ({"resourceType": "Encounter", "status": "open", "class": {"code": "AMB"}}, "Encounter.status"),
    ({"resourceType": "Patient", "gender": "f"}, "Patient.gender"),
    ({"resourceType": "MedicationRequest", "status": "active", "intent": "wish", "subject": {"reference": "P/1"},
      "medicationCodeableConcept": {"text": "x"}}, "MedicationRequest.intent"),
    ({"resourceType": "MedicationRequest", "status": "taking", "intent": "order", "subject": {"reference": "P/1"},
      "medicationCodeableConcept": {"text": "x"}}, "MedicationRequest.status"),
    ({"resourceType": "Procedure", "status": "done", "subject": {"reference": "P/1"}}, "Procedure.status"),
    ({"resourceType": "ServiceRequest", "status": "active", "intent": "maybe", "subject": {"reference": "P/1"}},
     "ServiceRequest.intent"),
    ({"resourceType": "ServiceRequest", "status": "open", "intent": "order", "subject": {"reference": "P/1"}},
     "ServiceRequest.status"),
    ({"resourceType": "DocumentReference", "status": "draft", "content": [{"attachment": {"url": "x"}}]},
     "DocumentReference.status"),
    ({"resourceType": "ImagingStudy", "status": "done", "subject": {"reference": "P/1"}}, "ImagingStudy.status"),
    ({"resourceType": "AllergyIntolerance", "patient": {"reference": "P/1"}, "criticality": "very"},
     "AllergyIntolerance.criticality"),
    ({"resourceType": "AllergyIntolerance", "patient": {"reference": "P/1"}, "category": ["food", "pollen"]},
     "AllergyIntolerance.category[1]"),
    ({"resourceType": "Condition", "subject": {"reference": "P/1"}, "clinicalStatus": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "better"}]}},
     "Condition.clinicalStatus.coding[0].code"),
    ({"resourceType": "Condition", "subject": {"reference": "P/1"}, "clinicalStatus": {"text": "active"}},
     "Condition.clinicalStatus"),
    ({"resourceType": "AllergyIntolerance", "patient": {"reference": "P/1"}, "clinicalStatus": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "gone"}]}},
     "AllergyIntolerance.clinicalStatus.coding[0].code"),
]


def test_required_bindings_are_enforced_naming_the_element(fhir_client: httpx.Client) -> None:
    for resource, expression in BAD_BINDINGS:
        r = fhir_client.post(f"/fhir/{resource['resourceType']}", json=resource)
        assert r.status_code == 422, (expression, r.text)
        assert r.json()["issue"][0]["expression"] == [expression], r.text
    good = {"resourceType": "Condition", "subject": {"reference": "P/1"}, "clinicalStatus": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}}
    assert fhir_client.post("/fhir/Condition", json=good).status_code == 201


SAMPLE = {"token": "x", "date": "ge2020-01", "string": "a"}


def test_capability_statement_lists_exactly_what_the_server_does(fhir_client: httpx.Client) -> None:
    body = fhir_client.get("/fhir/metadata").json()
    get_fhir_model_class("CapabilityStatement").model_validate(body)
    (rest,) = body["rest"]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    types = {r["type"]: r for r in rest["resource"]}
    assert set(types) == {"Patient", "Encounter", "Condition", "Observation", "DiagnosticReport", "ImagingStudy",
                          "DocumentReference", "MedicationRequest", "AllergyIntolerance", "Procedure",
                          "ServiceRequest", "AuditEvent", "Provenance"}
    strict = {"Prefer": "handling=strict"}
    for rtype, res in types.items():
        assert {i["code"] for i in res["interaction"]} == {
            "read", "vread", "update", "delete", "history-instance", "history-type", "create", "search-type"}
        assert res["conditionalCreate"] and res["conditionalUpdate"]
        for param in res["searchParam"]:
            value = "Patient/x" if param["type"] == "reference" else SAMPLE[param["type"]]
            if param["type"] == "reference" and param["name"] not in ("patient", "subject"):
                value = "x"
            r = fhir_client.get(f"/fhir/{rtype}", params={param["name"]: value}, headers=strict)
            assert r.status_code == 200, (rtype, param, r.text)
        for include in res["searchInclude"]:
            r = fhir_client.get(f"/fhir/{rtype}", params={"_include": include}, headers=strict)
            assert r.status_code == 200, (rtype, include, r.text)
        r = fhir_client.get(f"/fhir/{rtype}/_history", params={"_count": 1})
        assert r.status_code == 200
    # and what it does not advertise, it refuses in strict mode
    r = fhir_client.get("/fhir/Observation", params={"value-quantity": "1"}, headers=strict)
    assert r.status_code == 400
