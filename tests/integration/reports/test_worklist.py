"""The reviewer's workstation API over HTTP: the worklist (filters, sorts, paging, counts, one entry per
study), claims, coded rejection reasons, stale decisions, quality metrics and the feedback export.

Reports are written by the real report writer from result events, as the pipeline writes them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from integration.db.store import Store
from integration.fhir.resources import store_resource, validate_resource
from integration.reports.writer import write_report
from schemas.events import ImagingInferenceCompleted, InstanceFinding
from tests import authorized
from tests.conftest import serve_app, stack_settings
from tests.integration.reports.test_review import add_ai_report, as_identity


def imaging_result(store: Store, study: str, revision: int = 1, p: float = 0.5, model: str = "lesion-net",
                   images: int = 2, study_ref: str | None = None) -> str:
    """A report as the pipeline writes it for ``images`` images of ``study``, top probability ``p``."""
    findings = [InstanceFinding(sop_instance_uid=f"{study}.{revision}.{n}", series_instance_uid=f"{study}.1",
                                probabilities={"lesion": p - 0.1 * n, "effusion": 0.05})
                for n in range(images)]
    event = ImagingInferenceCompleted(source_event_id=f"src-{study}-{revision}", study_instance_uid=study,
                                      revision=revision, patient_ref=f"Patient/pat-{study[-1]}",
                                      imaging_study_ref=study_ref, model_name=model, model_version="1.2",
                                      findings=findings)
    return write_report(store, event)


def client_as(port: int, sub: str, name: str) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, event_hooks={"request": [as_identity]},
                        headers={"x-test-sub": sub, "x-test-name": name})


@pytest.fixture
def served(store: Store, tmp_path: Path) -> Iterator[int]:
    with serve_app(stack_settings(tmp_path), store) as port:
        yield port


def test_worklist_shows_one_entry_per_study_with_every_revision_and_the_study_s_top_probability(
        store: Store, served: int) -> None:
    first = imaging_result(store, "1.2.3.1", revision=1, p=0.9)
    second = imaging_result(store, "1.2.3.1", revision=2, p=0.4)
    imaging_result(store, "1.2.3.2", p=0.6)
    with client_as(served, "u-1", "Dr One") as api:
        page = api.get("/api/worklist").json()
    assert page["total"] == 2 and page["counts"] == {"preliminary": 2}
    top = page["items"][0]
    assert top["report_id"] == second and top["study_instance_uid"] == "1.2.3.1"
    assert [r["id"] for r in top["reports"]] == [first, second]
    assert top["top_probability"] == pytest.approx(0.9) and top["instances"] == 4
    assert page["items"][1]["top_probability"] == pytest.approx(0.6)


def test_worklist_filters_sorts_and_pages(store: Store, served: int) -> None:
    for n, p in enumerate([0.2, 0.95, 0.7, 0.55]):
        imaging_result(store, f"1.2.9.{n}", p=p, model="lesion-net" if n % 2 else "other-net")
    legacy = add_ai_report(store)  # written before the index existed: indexed on the first read
    with client_as(served, "u-1", "Dr One") as api:
        likely = api.get("/api/worklist", params={"min_probability": 0.6}).json()["items"]
        probs = [i["top_probability"] for i in likely]
        assert probs == pytest.approx([0.95, 0.7])
        page = api.get("/api/worklist", params={"model": "lesion-net", "kind": "imaging"}).json()
        assert {i["model_name"] for i in page["items"]} == {"lesion-net"} and page["total"] == 2
        assert api.get("/api/worklist", params={"finding": "lesion", "patient": "pat-1"}).json()["total"] == 1
        waiting = api.get("/api/worklist", params={"sort": "waiting", "limit": 2, "offset": 1}).json()
        assert waiting["total"] == 5 and len(waiting["items"]) == 2 and waiting["offset"] == 1
        assert legacy in [i["report_id"] for i in api.get("/api/worklist").json()["items"]]
        assert api.get("/api/worklist", params={"status": "bogus"}).status_code == 400
        assert api.get("/api/worklist", params={"from": "2999-01-01T00:00:00Z"}).json()["total"] == 0


def test_priority_comes_from_the_originating_service_request(store: Store, served: int) -> None:
    with store.session() as s:
        store_resource(s, validate_resource({"resourceType": "ServiceRequest", "id": "sr-1", "status": "active",
                                             "intent": "order", "priority": "stat",
                                             "subject": {"reference": "Patient/pat-1"}}), track=False)
        store_resource(s, validate_resource({"resourceType": "ImagingStudy", "id": "is-1", "status": "available",
                                             "subject": {"reference": "Patient/pat-1"},
                                             "basedOn": [{"reference": "ServiceRequest/sr-1"}]}), track=False)
    imaging_result(store, "1.2.7.1", p=0.3)
    urgent = imaging_result(store, "1.2.7.2", p=0.1, study_ref="ImagingStudy/is-1")
    with client_as(served, "u-1", "Dr One") as api:
        items = api.get("/api/worklist", params={"sort": "priority"}).json()["items"]
    assert items[0]["report_id"] == urgent and items[0]["priority"] == "stat" and items[1]["priority"] is None


def test_a_claim_shows_who_reviews_and_keeps_others_out_until_released(store: Store, served: int) -> None:
    rid = imaging_result(store, "1.2.5.1")
    with client_as(served, "u-ada", "Dr Ada") as ada, client_as(served, "u-bob", "Dr Bob") as bob:
        assert ada.post(f"/api/reports/{rid}/claim").json()["mine"] is True
        refused = bob.post(f"/api/reports/{rid}/claim")
        assert refused.status_code == 409 and "in review by Dr Ada" in refused.text
        seen = bob.get("/api/worklist").json()["items"][0]["claim"]
        assert seen["reviewer"] == "Dr Ada" and seen["mine"] is False
        assert bob.delete(f"/api/reports/{rid}/claim").status_code == 409
        assert ada.delete(f"/api/reports/{rid}/claim").status_code == 204
        assert bob.post(f"/api/reports/{rid}/claim").status_code == 200
        assert ada.post("/api/reports/unknown-report/claim").status_code == 404
    # claiming is a reviewer's act: an integration token may read but not claim
    r = httpx.post(f"http://127.0.0.1:{served}/api/reports/{rid}/claim", headers=authorized.headers("integration"))
    assert r.status_code == 403


def _decide(api: httpx.Client, rid: str, body: dict) -> httpx.Response:
    etag = api.get(f"/api/reports/{rid}").headers["ETag"]
    return api.post(f"/api/reports/{rid}/review", json=body, headers={"If-Match": etag})


def test_rejection_needs_a_coded_reason_and_other_needs_text(store: Store, served: int) -> None:
    rid = imaging_result(store, "1.2.6.1")
    with client_as(served, "u-1", "Dr One") as api:
        assert _decide(api, rid, {"action": "entered-in-error"}).status_code == 422
        assert _decide(api, rid, {"action": "entered-in-error", "reason": "other"}).status_code == 422
        assert _decide(api, rid, {"action": "entered-in-error", "reason": "image-quality"}).status_code == 422
        ok = _decide(api, rid, {"action": "entered-in-error", "reason": "poor-image-quality"})
        assert ok.status_code == 200 and ok.json()["reviews"][0]["reason"] == "poor-image-quality"


def test_a_stale_decision_gets_a_412_that_says_what_to_do(store: Store, served: int) -> None:
    rid = imaging_result(store, "1.2.6.2")
    with client_as(served, "u-1", "Dr One") as one, client_as(served, "u-2", "Dr Two") as two:
        etag = two.get(f"/api/reports/{rid}").headers["ETag"]
        assert _decide(one, rid, {"action": "final"}).status_code == 200
        stale = two.post(f"/api/reports/{rid}/review", json={"action": "final"}, headers={"If-Match": etag})
    assert stale.status_code == 412 and "someone reviewed it meanwhile" in stale.text


def test_quality_and_feedback_count_each_decision_by_reason_model_and_modality(store: Store, served: int) -> None:
    a, b = (imaging_result(store, f"1.2.8.{n}", model="lesion-net") for n in range(2))
    c = imaging_result(store, "1.2.8.2", model="other-net")
    with client_as(served, "u-1", "Dr One") as api:
        assert _decide(api, a, {"action": "final"}).status_code == 200
        assert _decide(api, b, {"action": "amended", "conclusion": "No lesion."}).status_code == 200
        assert _decide(api, c, {"action": "entered-in-error", "reason": "missed-finding"}).status_code == 200
        q = api.get("/api/quality", params={"from": "2000-01-01T00:00:00Z"}).json()
        lines = api.get("/api/feedback", params={"since": "2000-01-01T00:00:00Z"})
        later = api.get("/api/feedback", params={"since": "2999-01-01T00:00:00Z"}).text
    assert q["overall"]["decisions"] == 3 and q["overall"]["acceptance_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert q["rejection_reasons"] == {"missed-finding": 1}
    assert q["time_to_sign_p50_seconds"] is not None and q["time_to_sign_p90_seconds"] >= q["time_to_sign_p50_seconds"]
    assert [g["key"] for g in q["by_model"]] == ["lesion-net 1.2", "other-net 1.2"]
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in lines.text.splitlines()]
    assert [r["decision"] for r in records] == ["final", "amended", "entered-in-error"]
    assert records[1]["reviewer_final_text"] == "No lesion." and records[1]["model_output"]["conclusion"]
    assert records[2]["reason"] == "missed-finding" and records[2]["model_name"] == "other-net"
    assert later == ""
