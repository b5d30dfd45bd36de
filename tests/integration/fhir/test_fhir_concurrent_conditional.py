"""Conditional creates and updates of the same criteria at the same moment (an EHR pushing one patient twice,
over two MedBridge processes on one database): exactly one resource results, which every other request
finds, as it would arriving a moment later (FHIR R4 http.html#ccreate, #cond-update)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.db.store import Store
from integration.fhir.resources import store_resource
from integration.fhir.search import conditional_key
from integration.fhir.storage import serialize_conditional
from tests import authorized
from tests.conftest import serve_app, stack_settings
from tests.integration.fhir.conftest import at_once, clients_for

WRITERS = 6  # threads released together, spread over the two apps
ROUNDS = 5
SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"

# the same criteria spelt three ways: the parameters in another order, the value percent-encoded
CRITERIA = ("identifier={system}|{value}&birthdate=1970-01-01",
            "birthdate=1970-01-01&identifier={system}|{value}",
            "identifier={system}%7C{value}&birthdate=1970-01-01")


def _criteria(i: int, value: str) -> str:
    return CRITERIA[i % len(CRITERIA)].format(system=SYSTEM, value=value)


def _patient(value: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": value}],
            "birthDate": "1970-01-01", "name": [{"family": "Race"}]}


@pytest.fixture
def writers(shared_database_ports: list[int]) -> Iterator[list[httpx.Client]]:
    with ExitStack() as stack:
        yield clients_for(stack, shared_database_ports, WRITERS)


def _patients_with(client: httpx.Client, value: str) -> list[str]:
    found = client.get("/fhir/Patient", params={"identifier": f"{SYSTEM}|{value}", "_total": "accurate"}).json()
    return [e["resource"]["id"] for e in found.get("entry", [])]


def test_concurrent_if_none_exist_creates_make_one_patient_that_every_request_names(
        writers: list[httpx.Client]) -> None:
    for n in range(ROUNDS):
        value = f"mrn-post-{n}"
        responses = at_once(writers, lambda i, c, value=value: c.post(
            "/fhir/Patient", json=_patient(value), headers={"If-None-Exist": _criteria(i, value)}))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * (WRITERS - 1) + [201], [r.text[:300] for r in responses]
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        assert _patients_with(writers[0], value) == list(ids)
        assert all(r.json()["meta"]["versionId"] == "1" for r in responses)  # found, not rewritten


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_concurrent_bundles_with_if_none_exist_make_one_patient(writers: list[httpx.Client], kind: str) -> None:
    for n in range(ROUNDS):
        value = f"mrn-{kind}-{n}"

        def send(i: int, client: httpx.Client, value: str = value) -> httpx.Response:
            entries: list[dict[str, Any]] = [
                {"fullUrl": "urn:uuid:6b9f4a3e-0000-4000-8000-000000000001", "resource": _patient(value),
                 "request": {"method": "POST", "url": "Patient", "ifNoneExist": _criteria(i, value)}}]
            if kind == "transaction":  # pointing at the patient, whether created or found
                entries.append({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                             "subject": {"reference": "urn:uuid:6b9f4a3e-0000-4000-8000-000000000001"}},
                                "request": {"method": "POST", "url": "Observation"}})
            return client.post("/fhir", json={"resourceType": "Bundle", "type": kind, "entry": entries})

        responses = at_once(writers, send)
        assert [r.status_code for r in responses] == [200] * WRITERS, [r.text[:300] for r in responses]
        first = [r.json()["entry"][0]["response"] for r in responses]
        assert sorted(e["status"] for e in first) == ["200 OK"] * (WRITERS - 1) + ["201 Created"], first
        locations = {e["location"] for e in first}
        assert len(locations) == 1, locations
        pid = locations.pop().split("/")[1]
        assert _patients_with(writers[0], value) == [pid]
        if kind == "transaction":
            found = writers[1].get("/fhir/Observation", params={"subject": f"Patient/{pid}"}).json()
            assert found["total"] == WRITERS  # every transaction's Observation, on the one patient


def test_concurrent_conditional_updates_with_no_match_make_one_patient_with_every_version(
        writers: list[httpx.Client]) -> None:
    for n in range(ROUNDS):
        value = f"mrn-put-{n}"
        responses = at_once(writers, lambda i, c, value=value: c.put(
            f"/fhir/Patient?{_criteria(i, value)}", json={**_patient(value), "gender": ["male", "female"][i % 2]}))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * (WRITERS - 1) + [201], [r.text[:300] for r in responses]
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        pid = ids.pop()
        assert _patients_with(writers[0], value) == [pid]
        # each request updated the one resource in turn: versions 1 to WRITERS, none lost
        assert sorted(int(r.json()["meta"]["versionId"]) for r in responses) == list(range(1, WRITERS + 1))
        history = writers[0].get(f"/fhir/Patient/{pid}/_history").json()
        assert history["total"] == WRITERS


def test_a_conditional_create_waits_for_one_in_progress_and_then_finds_its_patient(
        store: Store, tmp_path: Path) -> None:
    """Deterministic: a writer holds the criteria's lock (as a conditional create that has searched and not
    yet committed does); the request waits, then finds what that writer committed rather than creating."""
    value = "mrn-held"
    criteria = _criteria(0, value)
    with serve_app(stack_settings(tmp_path), store) as port, authorized.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"Content-Type": "application/fhir+json"}
    ) as client:
        answer: list[httpx.Response] = []
        with store.session() as s:
            serialize_conditional(s, [conditional_key("Patient", _criteria(1, value))])  # another spelling
            request = threading.Thread(target=lambda: answer.append(client.post(
                "/fhir/Patient", json=_patient(value), headers={"If-None-Exist": criteria})))
            request.start()
            time.sleep(0.5)
            assert not answer, "the conditional create did not wait for the writer holding its criteria"
            stored, _ = store_resource(s, {**_patient(value), "id": "held-first"})
        request.join(60)
        assert [r.status_code for r in answer] == [200], [r.text[:300] for r in answer]
        assert answer[0].json()["id"] == "held-first"
        assert _patients_with(client, value) == ["held-first"]


def test_conditional_keys_ignore_parameter_order_and_percent_encoding_only() -> None:
    same = {conditional_key("Patient", _criteria(i, "m")) for i in range(len(CRITERIA))}
    assert len(same) == 1
    assert conditional_key("Patient", "?identifier=a|b") == conditional_key("Patient", "identifier=a|b")
    others = {conditional_key("Patient", "identifier=a|c"), conditional_key("Group", "identifier=a|b"),
              conditional_key("Patient", "identifier=a%26b"), conditional_key("Patient", "identifier=a&b"),
              conditional_key("Patient", "identifier=a|b")}
    assert len(others) == 5  # an encoded '&' is part of a value, a plain one separates parameters
