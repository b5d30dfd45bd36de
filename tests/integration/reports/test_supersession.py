"""One current clinical draft per patient: a newer draft cancels the earlier preliminary one with a link
both ways, a signed report is never superseded, a late stale draft never becomes the current one.

Reports are written by the report writer's own path (``write_report``) into the real store on SQLite
and PostgreSQL; the worklist and the review are read and made over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from integration.db.store import Store
from integration.delivery import queue
from integration.delivery.plan import NO_DESTINATIONS, Destinations
from integration.reports.supersession import FOLLOWS_SIGNED_URL, REPLACES_URL, SUPERSEDED_BY_URL
from integration.reports.writer import write_report
from schemas.events import ClinicalInferenceCompleted
from tests import authorized
from tests.conftest import serve_app, stack_settings

PATIENT = "Patient/p-supersede"


def draft(store: Store, revision: int, patient: str = PATIENT, destinations: Destinations = NO_DESTINATIONS) -> str:
    """The clinical report of the patient's record revision ``revision``, as the clinical worker's result
    event makes the report writer write it; its id."""
    event = ClinicalInferenceCompleted(source_event_id=f"record-{revision}", patient_ref=patient, revision=revision,
                                       model_name="tiny", impression=f"Impression of revision {revision}.",
                                       evidence=[])
    return write_report(store, event, destinations)


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    with serve_app(stack_settings(tmp_path), store) as port, authorized.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client


def report(api: httpx.Client, rid: str) -> dict:
    r = api.get(f"/fhir/DiagnosticReport/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


def links(report: dict, url: str) -> list[str]:
    return [e["valueReference"]["reference"] for e in report.get("extension", []) if e["url"] == url]


def sign(api: httpx.Client, rid: str) -> httpx.Response:
    etag = api.get(f"/api/reports/{rid}").headers["ETag"]
    return api.post(f"/api/reports/{rid}/review", json={"action": "final"}, headers={"If-Match": etag})


def clinical_worklist(api: httpx.Client, patient: str = PATIENT) -> list[dict]:
    r = api.get("/api/worklist", params={"kind": "clinical", "patient": patient})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_a_newer_draft_cancels_the_preliminary_one_and_the_worklist_shows_one(store: Store, api: httpx.Client) -> None:
    first = draft(store, 1)
    second = draft(store, 2)
    old, new = report(api, first), report(api, second)
    assert old["status"] == "cancelled" and links(old, SUPERSEDED_BY_URL) == [f"DiagnosticReport/{second}"]
    assert new["status"] == "preliminary" and links(new, REPLACES_URL) == [f"DiagnosticReport/{first}"]
    (item,) = clinical_worklist(api)
    assert item["report_id"] == second and item["status"] == "preliminary"
    assert {r["id"]: r["status"] for r in item["reports"]} == {first: "cancelled", second: "preliminary"}
    # the superseded draft can no longer be signed: the reviewer is sent to the newer one
    r = sign(api, first)
    assert r.status_code == 409 and "superseded" in r.json()["issue"][0]["diagnostics"]
    # the same result delivered again rewrites the same report and cancels nothing more
    assert draft(store, 2) == second
    assert report(api, second)["status"] == "preliminary" and report(api, first)["status"] == "cancelled"


def test_the_cancelled_status_filter_lists_the_superseded_drafts_as_entries_of_their_own(
        store: Store, api: httpx.Client) -> None:
    first, second = draft(store, 1), draft(store, 2)
    page = api.get("/api/worklist", params={"kind": "clinical", "patient": PATIENT,
                                            "status": "preliminary,cancelled"}).json()
    assert {i["report_id"]: i["status"] for i in page["items"]} == {first: "cancelled", second: "preliminary"}
    assert page["total"] == 2 and page["counts"] == {"cancelled": 1, "preliminary": 1}
    cancelled = api.get("/api/worklist", params={"kind": "clinical", "status": "cancelled"}).json()
    assert [i["report_id"] for i in cancelled["items"]] == [first] and cancelled["total"] == 1
    # without asking for them, the patient's one entry stands alone
    assert [i["report_id"] for i in clinical_worklist(api)] == [second]


def test_a_signed_report_is_never_superseded(store: Store, api: httpx.Client) -> None:
    first = draft(store, 1)
    assert sign(api, first).status_code == 200
    second = draft(store, 2)
    assert report(api, first)["status"] == "final" and not links(report(api, first), SUPERSEDED_BY_URL)
    new = report(api, second)
    assert new["status"] == "preliminary" and links(new, FOLLOWS_SIGNED_URL) == [f"DiagnosticReport/{first}"]
    assert not links(new, REPLACES_URL)
    (item,) = clinical_worklist(api)
    assert item["report_id"] == second


def test_a_late_older_draft_is_stored_cancelled_and_never_becomes_current(store: Store, api: httpx.Client) -> None:
    third = draft(store, 3)
    late = draft(store, 2)  # a redelivered result of an earlier revision, after the newer report
    stale = report(api, late)
    assert stale["status"] == "cancelled" and links(stale, SUPERSEDED_BY_URL) == [f"DiagnosticReport/{third}"]
    assert report(api, third)["status"] == "preliminary"
    (item,) = clinical_worklist(api)
    assert item["report_id"] == third
    other = draft(store, 1, patient="Patient/someone-else")  # another patient's drafts are not touched
    assert report(api, other)["status"] == "preliminary"


def test_an_ehr_that_holds_the_draft_is_sent_its_cancellation(store: Store) -> None:
    ehr = Destinations(ehr=("http://ehr.example/fhir",))
    first = draft(store, 1, destinations=ehr)
    with store.session() as s:  # the EHR has the draft: its create was sent
        queue.issued_job(s, "ehr", ehr.ehr[0], first).state = "sent"
    draft(store, 2, destinations=ehr)
    with store.session() as s:
        job = queue.last_job(s, "ehr", ehr.ehr[0], first)
        assert job is not None and job.what == "rewritten" and job.state != "sent"
        assert job.payload["report"]["status"] == "cancelled"
