"""Two writers creating the same new id at the same moment (two MedBridge processes on one database, as a
cluster runs them): the loser becomes the next version, as it would arriving a moment later, never a 500."""

from __future__ import annotations

import httpx

from tests.integration.fhir.conftest import at_once

ROUNDS = 12


def test_concurrent_puts_of_the_same_new_id_make_versions_1_and_2(two_servers: list[httpx.Client]) -> None:
    for n in range(ROUNDS):
        rid = f"race-{n}"
        responses = at_once(two_servers, lambda _i, c, rid=rid: c.put(
            f"/fhir/Patient/{rid}", json={"resourceType": "Patient", "id": rid}))
        assert sorted(r.status_code for r in responses) == [200, 201], [r.text[:300] for r in responses]
        assert sorted(r.json()["meta"]["versionId"] for r in responses) == ["1", "2"]
        history = two_servers[0].get(f"/fhir/Patient/{rid}/_history").json()
        assert sorted(e["resource"]["meta"]["versionId"] for e in history["entry"]) == ["1", "2"]


def test_concurrent_transactions_creating_the_same_id_both_commit_whole(two_servers: list[httpx.Client]) -> None:
    for n in range(ROUNDS):
        rid = f"tx-{n}"
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "id": rid}, "request": {"method": "PUT", "url": f"Patient/{rid}"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                          "subject": {"reference": f"Patient/{rid}"}},
             "request": {"method": "POST", "url": "Observation"}}]}
        responses = at_once(two_servers, lambda _i, c, bundle=bundle: c.post("/fhir", json=bundle))
        assert [r.status_code for r in responses] == [200, 200], [r.text[:300] for r in responses]
        statuses = sorted(r.json()["entry"][0]["response"]["status"] for r in responses)
        assert statuses == ["200 OK", "201 Created"]
        found = two_servers[1].get("/fhir/Observation", params={"subject": f"Patient/{rid}"}).json()
        assert found["total"] == 2  # each transaction's Observation, none lost, none half-written
