"""The query API (/api) answers hostile ids and parameters with a 4xx that says what to send, never a 500,
on SQLite and PostgreSQL alike, and writes nothing for them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from integration.db.store import Store
from integration.db.tables import AiResult, Review
from integration.fhir.resources import store_resource, validate_resource
from tests import authorized
from tests.conftest import serve_app, stack_settings

REPORT = {"resourceType": "DiagnosticReport", "id": "r1", "status": "preliminary", "code": {"text": "AI read"}}


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    # the replay routes' tables belong to modules the store fixture had not imported when it started
    import integration.app.http  # noqa: F401
    from integration.db.store import Base

    Base.metadata.create_all(store.engine)
    with store.session() as s:
        store_resource(s, validate_resource(dict(REPORT)), track=False)
        s.add(AiResult(report_id="r1", kind="imaging", source_event_id="e1", details={"instances": []}))
    with serve_app(stack_settings(tmp_path), store) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30
    ) as client:
        yield client


def test_report_ids_that_are_not_fhir_ids_are_unknown(api: httpx.Client) -> None:
    assert api.get("/api/reports/r1").status_code == 200
    for rid in ("a%00b", "x" * 200, "%C3%A9"):
        for path in (f"/api/reports/{rid}", f"/api/reports/{rid}/image.png"):
            r = api.get(path)
            assert r.status_code == 404, path[:40]
        r = api.post(f"/api/reports/{rid}/review", json={"action": "final"}, headers={"If-Match": 'W/"1"'})
        assert r.status_code == 404, rid[:20]


def test_report_status_filter_takes_only_diagnostic_report_statuses(api: httpx.Client) -> None:
    assert [r["id"] for r in api.get("/api/reports", params={"status": "preliminary,final"}).json()] == ["r1"]
    assert api.get("/api/reports", params={"status": "final"}).json() == []
    for status in ("a\u0000b", "x" * 5000, "preliminary,bogus"):
        r = api.get("/api/reports", params={"status": status})
        assert r.status_code == 400, status[:20]
        assert "DiagnosticReport statuses" in r.json()["detail"] and "preliminary" in r.json()["detail"]


def test_a_review_with_control_characters_is_refused_naming_the_field_and_records_nothing(
    api: httpx.Client, store: Store
) -> None:
    for body in ({"action": "final", "reviewer": "Dr\u0000A"},
                 {"action": "final", "reviewer": "Dr A", "comment": "ok\u0000"},
                 {"action": "amended", "reviewer": "Dr A", "conclusion": "no\u0000 lesion"}):
        r = api.post("/api/reports/r1/review", json=body, headers={"If-Match": 'W/"1"'})
        assert r.status_code == 422, body
        field = next(k for k, v in body.items() if "\u0000" in v)
        assert [e["loc"] for e in r.json()["detail"]] == [["body", field]]
        assert "control character" in r.json()["detail"][0]["msg"]
    with store.session() as s:
        assert s.query(Review).count() == 0
    assert api.get("/api/reports/r1").json()["status"] == "preliminary"
    ok = api.post("/api/reports/r1/review", json={"action": "final", "reviewer": "Dr A", "comment": "line\r\n\tok"},
                  headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.json()["reviews"][0]["comment"] == "line\r\n\tok"


def test_replay_ids_beyond_the_tables_range_are_unknown(api: httpx.Client) -> None:
    for job_id in ("0", "-1", "2147483648", "9223372036854775808", "99999999999999999999"):
        r = api.post(f"/api/dicom-exports/{job_id}/replay")
        assert r.status_code == 404 and "GET /api/dicom-exports" in r.json()["detail"], job_id
        r = api.post(f"/api/writebacks/{job_id}/replay")
        assert r.status_code == 404 and "GET /api/writebacks" in r.json()["detail"], job_id
        r = api.post(f"/api/deliveries/{job_id}/replay")
        assert r.status_code == 404 and "GET /api/deliveries" in r.json()["detail"], job_id
