"""Values a database column cannot hold (NUL, overlong strings, numbers and dates out of range) get a 4xx
OperationOutcome naming the element, or are stored whole: never a 500, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from typing import Any

import httpx

OBSERVATION = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
# a real R4 ResearchStudy.status code, longer than fhir_resources.status (32 characters)
LONG_STATUS = "temporarily-closed-to-accrual-and-intervention"


def _transaction(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}} for r in resources]}


def _count(client: httpx.Client, rtype: str) -> int:
    return client.get(f"/fhir/{rtype}", params={"_summary": "count"}).json()["total"]


def _expressions(r: httpx.Response) -> list[str]:
    return [e for issue in r.json()["issue"] for e in issue.get("expression", [])]


def test_control_characters_in_strings_are_refused_naming_the_element(fhir_client: httpx.Client) -> None:
    r = fhir_client.post("/fhir/Observation", json={**OBSERVATION, "note": [{"text": "a\u0000b"}]})
    assert r.status_code == 422 and _expressions(r) == ["Observation.note[0].text"]
    assert "U+0000" in r.json()["issue"][0]["diagnostics"]
    r = fhir_client.post("/fhir/Patient", json={"resourceType": "Patient", "identifier": [{"value": "mrn\u001f"}]})
    assert r.status_code == 422 and _expressions(r) == ["Patient.identifier[0].value"]
    ok = fhir_client.post("/fhir/Observation", json={**OBSERVATION, "note": [{"text": "line\r\n\ttabbed"}]})
    assert ok.status_code == 201 and ok.json()["note"][0]["text"] == "line\r\n\ttabbed"

    coded = {**OBSERVATION, "category": [{"coding": [{"system": "urn:x", "code": "a\u0000"}]}]}
    r = fhir_client.post("/fhir", json=_transaction(OBSERVATION, coded))
    assert r.status_code == 422
    assert _expressions(r) == ["Bundle.entry[1].resource.category[0].coding[0].code"]
    assert _count(fhir_client, "Observation") == 1  # the transaction's first entry is not kept either

    batch = {"resourceType": "Bundle", "type": "batch", "entry": _transaction(OBSERVATION, coded)["entry"]}
    out = fhir_client.post("/fhir", json=batch).json()["entry"]
    assert out[0]["response"]["status"] == "201 Created" and out[1]["response"]["status"] == "422"
    assert out[1]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[1].resource.category[0].coding[0].code"]


def test_a_status_longer_than_its_column_is_stored_whole(fhir_client: httpx.Client) -> None:
    study = {"resourceType": "ResearchStudy", "status": LONG_STATUS}
    created = fhir_client.post("/fhir/ResearchStudy", json=study)
    assert created.status_code == 201
    assert fhir_client.get(f"/fhir/ResearchStudy/{created.json()['id']}").json()["status"] == LONG_STATUS
    task = {"resourceType": "Task", "status": "x" * 40, "intent": "order"}  # Task.status is not checked here
    r = fhir_client.post("/fhir", json=_transaction(study, task))
    assert r.status_code == 200 and _count(fhir_client, "Task") == 1


def test_ids_longer_than_64_or_not_fhir_ids_are_refused_or_unknown(fhir_client: httpx.Client) -> None:
    long_id = "a" * 65
    r = fhir_client.put(f"/fhir/Patient/{long_id}", json={"resourceType": "Patient", "id": long_id})
    assert r.status_code == 422 and _expressions(r) == ["Patient.id"]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": f"Patient/{'b' * 100}"}},
        {"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "Patient/a\u0000b"}}]}
    r = fhir_client.post("/fhir", json=bundle)
    assert r.status_code == 400 and _expressions(r) == ["Bundle.entry[0].request.url"]
    bundle["entry"] = bundle["entry"][1:]
    r = fhir_client.post("/fhir", json=bundle)
    assert r.status_code == 400 and _expressions(r) == ["Bundle.entry[0].request.url"]
    assert _count(fhir_client, "Patient") == 0

    stored = fhir_client.post("/fhir/Patient", json={"resourceType": "Patient"}).json()["id"]
    for path in ("/fhir/Patient/a%00b", "/fhir/Patient/a%00b/_history", "/fhir/Patient/a%00b/_history/1",
                 f"/fhir/Patient/{stored}/_history/99999999999999999999", f"/fhir/Patient/{'c' * 100}"):
        r = fhir_client.get(path)
        assert r.status_code == 404 and r.json()["issue"][0]["code"] == "not-found", path
    assert fhir_client.delete("/fhir/Patient/a%00b").status_code == 204  # nothing there, as for an unknown id


def test_a_subject_reference_no_patient_can_have_is_stored_and_searchable(fhir_client: httpx.Client) -> None:
    target = f"Patient/{'p' * 200}"  # longer than a FHIR id: no Patient's record changes
    created = fhir_client.post("/fhir/Observation", json={**OBSERVATION, "subject": {"reference": target}})
    assert created.status_code == 201
    found = fhir_client.get("/fhir/Observation", params={"subject": target}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [created.json()["id"]]


def test_a_transaction_with_an_unstorable_status_and_a_missing_target_is_a_422_and_writes_nothing(
    fhir_client: httpx.Client,
) -> None:
    """The status is too long for its column and the Observation points at a Patient that is not stored: on
    PostgreSQL the rows were sent before the target check, and the column's refusal came back as a 500."""
    task = {"resourceType": "Task", "status": "x" * 40, "intent": "order"}
    orphan = {**OBSERVATION, "subject": {"reference": "Patient/missing"}}
    r = fhir_client.post("/fhir", json=_transaction(task, orphan))
    assert r.status_code == 422 and _expressions(r) == ["Bundle.entry[1].resource.subject.reference"]
    assert "Patient/missing is neither in this bundle nor stored" in r.json()["issue"][0]["diagnostics"]
    assert (_count(fhir_client, "Task"), _count(fhir_client, "Observation")) == (0, 0)


def test_a_transaction_whose_rows_cannot_be_sent_is_refused_by_the_validation(fhir_client: httpx.Client) -> None:
    """A lone surrogate (JSON allows the escape, Unicode no such character): PostgreSQL's rows could not be
    serialised, which failed the Bundle before its validation ran."""
    coded = '{"resourceType": "Observation", "status": "final", "code": {"coding": [{"code": "\\ud800"}]}}'
    body = ('{"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": ' + coded
            + ', "request": {"method": "POST", "url": "Observation"}}]}')
    r = fhir_client.post("/fhir", content=body.encode())
    assert r.status_code == 422 and _expressions(r) == ["Bundle.entry[0].resource.code.coding[0].code"]
    assert _count(fhir_client, "Observation") == 0


def test_paging_numbers_beyond_the_stores_range_are_refused_naming_the_parameter(fhir_client: httpx.Client) -> None:
    for path in ("/fhir/Patient", "/fhir/Patient/_history"):
        for value in ("9223372036854775808", "9" * 5000):
            r = fhir_client.get(path, params={"_offset": value})
            assert r.status_code == 400 and _expressions(r) == ["_offset"], (path, value[:20])
        r = fhir_client.get(path, params={"_count": "\u00b2"})  # str.isdigit() says yes, int() no
        assert r.status_code == 400 and _expressions(r) == ["_count"]
        assert fhir_client.get(path, params={"_count": "9" * 30}).status_code == 200  # capped, as before


def test_dates_at_the_ends_of_the_calendar_are_stored_and_searched(fhir_client: httpx.Client) -> None:
    late = fhir_client.post("/fhir/Observation", json={**OBSERVATION, "effectiveDateTime": "9999-12-31"})
    assert late.status_code == 201
    early = fhir_client.post("/fhir/Observation",
                             json={**OBSERVATION, "effectiveDateTime": "0001-01-01T00:00:00+14:00"})
    assert early.status_code == 201
    found = fhir_client.get("/fhir/Observation", params={"date": "9999"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [late.json()["id"]]
    for params in ({"date": "gt9999-12-31"}, {"date": "ap0001"}, {"date": "ap9999"},
                   {"date": "9999-12-31T23:00:00-14:00"}, {"_lastUpdated": "0001-01-01T00:00:00+14:00"}):
        r = fhir_client.get("/fhir/Observation", params=params)
        assert r.status_code == 200, params


def test_values_longer_than_the_index_column_are_found_by_exact_and_prefix_search(
    fhir_client: httpx.Client,
) -> None:
    system, value, family = "urn:" + "s" * 296, "v" * 300, "f" * 300
    patient = {"resourceType": "Patient", "identifier": [{"system": system, "value": value}],
               "name": [{"family": family}]}
    pid = fhir_client.post("/fhir/Patient", json=patient).json()["id"]
    for params in ({"identifier": value}, {"identifier": f"{system}|{value}"}, {"name": family},
                   {"family": family[:280]}):
        found = fhir_client.get("/fhir/Patient", params=params).json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [pid], list(params)
    assert fhir_client.get("/fhir/Patient", params={"name": "\U0010ffff"}).status_code == 200
