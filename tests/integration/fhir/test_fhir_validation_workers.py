"""Validation workers (integration.fhir.validation): real worker processes validate part of each large
transaction Bundle beside the request thread. What they refuse is refused as the request thread would,
naming the entry, and nothing is stored; a worker that dies or hangs costs time, never a verdict."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration.db.store import Store
from integration.fhir import validation as fhir_validation
from integration.fhir.validation import ValidationWorkers
from tests import authorized
from tests.conftest import serve_app, stack_settings

ENTRIES = 20  # above fhir_validation.MIN_SHARED; the worker's share is at least the last 4 entries


def transaction(n: int = ENTRIES, bad: int | None = None) -> dict[str, Any]:
    """A Patient and n-1 Observations about it; entry ``bad`` has a status outside its value set."""
    entries: list[dict[str, Any]] = [{"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient"},
                                      "request": {"method": "POST", "url": "Patient"}}]
    for i in range(1, n):
        entries.append({"resource": {
            "resourceType": "Observation", "status": "not-a-status" if i == bad else "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": "urn:uuid:p"}, "valueQuantity": {"value": i, "unit": "g/dL"}},
            "request": {"method": "POST", "url": "Observation"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def wait_ready(workers: ValidationWorkers, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while workers.ready() < workers.count:
        assert time.monotonic() < deadline, "the validation worker did not start"
        time.sleep(0.05)


@pytest.fixture
def workers() -> Iterator[ValidationWorkers]:
    w = ValidationWorkers(1)
    yield w
    w.stop()


@pytest.fixture
def client(store: Store, tmp_path: Path, workers: ValidationWorkers) -> Iterator[httpx.Client]:
    with serve_app(stack_settings(tmp_path), store, workers) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"Content-Type": "application/fhir+json"}
    ) as c:
        assert c.post("/fhir", json=transaction()).status_code == 200  # starts the worker (validated alone)
        wait_ready(workers)
        yield c


def observations(c: httpx.Client) -> int:
    return c.get("/fhir/Observation", params={"_summary": "count"}).json()["total"]


def test_a_large_bundle_is_validated_partly_by_a_worker_and_stored_whole(
    client: httpx.Client, workers: ValidationWorkers
) -> None:
    r = client.post("/fhir", json=transaction())
    assert r.status_code == 200 and len(r.json()["entry"]) == ENTRIES
    assert workers.answered == 1
    assert observations(client) == 2 * (ENTRIES - 1)  # the start-up bundle's and this one's
    small = client.post("/fhir", json=transaction(fhir_validation.MIN_SHARED - 1))
    assert small.status_code == 200 and workers.answered == 1  # a small bundle is not worth a round trip


def test_a_refusal_in_either_share_names_its_entry_and_nothing_is_stored(
    client: httpx.Client, workers: ValidationWorkers
) -> None:
    for bad, answered in ((ENTRIES - 1, 1), (1, 2)):  # in the worker's share, then in the request's
        r = client.post("/fhir", json=transaction(bad=bad))
        assert r.status_code == 422, r.text
        issue = r.json()["issue"][0]
        assert issue["expression"] == [f"Bundle.entry[{bad}].resource.status"]
        assert "not-a-status" in issue["diagnostics"]
        assert workers.answered == answered  # read even when the request's own share failed first ...
        assert workers.ready() == 1  # ... so the worker is free for the next bundle
    assert observations(client) == ENTRIES - 1  # only the start-up bundle's


def test_a_worker_that_dies_or_hangs_leaves_its_share_to_the_request(
    client: httpx.Client, workers: ValidationWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    (dead,) = workers.pids()
    os.kill(dead, signal.SIGKILL)
    r = client.post("/fhir", json=transaction(bad=ENTRIES - 1))  # the dead worker's share has the error
    assert r.status_code == 422
    assert r.json()["issue"][0]["expression"] == [f"Bundle.entry[{ENTRIES - 1}].resource.status"]
    assert workers.answered == 0
    wait_ready(workers)  # a new worker took its place
    (hung,) = workers.pids()
    assert hung != dead
    monkeypatch.setattr(fhir_validation, "ANSWER_TIMEOUT_S", 1.0)
    os.kill(hung, signal.SIGSTOP)
    t0 = time.monotonic()
    assert client.post("/fhir", json=transaction()).status_code == 200
    assert time.monotonic() - t0 >= 1.0 and workers.answered == 0
    wait_ready(workers)
    assert workers.pids() != [hung]
    assert client.post("/fhir", json=transaction()).status_code == 200 and workers.answered == 1
    assert observations(client) == 3 * (ENTRIES - 1)


def test_stop_ends_the_workers() -> None:
    workers = ValidationWorkers(2)
    assert workers.share([{"resourceType": "Patient"}] * ENTRIES) is None  # starts them; none ready yet
    wait_ready(workers)
    share = workers.share([{"resourceType": "Patient"}] * (ENTRIES - 1) + [{"resourceType": "Patient", "gender": "x"}])
    assert share is not None
    outcomes = share.outcomes()
    assert outcomes is not None and outcomes[:-1] == [None] * (len(outcomes) - 1)
    status, issues = outcomes[-1]
    assert status == 422 and issues[0][0] == "Patient.gender"
    pids = workers.pids()
    workers.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert workers.share([{"resourceType": "Patient"}] * ENTRIES) is None
