"""The admin routes over the one delivery table: /api/deliveries for both kinds, /api/writebacks and
/api/dicom-exports for one kind each, and the /metrics backlog gauges, over real HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx

from integration.db.store import Store
from integration.delivery import queue
from integration.reports.writer import write_report
from tests import authorized
from tests.conftest import serve_app, stack_settings
from tests.integration.delivery.test_queue import TARGETS, imaging_event

BACKLOG_GAUGES = ("medbridge_writeback_pending", "medbridge_writeback_dead", "medbridge_dicom_export_pending",
                  "medbridge_dicom_export_dead")


def gauges(client: httpx.Client) -> dict[str, float]:
    """The four unlabelled backlog gauges (the other families are checked in tests/integration/observability)."""
    lines = [ln.split() for ln in client.get("/metrics").text.splitlines() if ln and not ln.startswith("#")]
    return {line[0]: float(line[1]) for line in lines if line[0] in BACKLOG_GAUGES}


def test_deliveries_are_listed_by_kind_without_payload_and_replayed_only_where_they_belong(
    store: Store, tmp_path: Path
) -> None:
    report_id = write_report(store, imaging_event(), TARGETS)
    (pacs_job, *_) = queue.claim_due(store, "pacs", lease_seconds=60)
    queue.record_failure(store, pacs_job, "PACS_A refused a Comprehensive SR Storage with status 0xA700",
                         queue.RetryPolicy(1, 1, 1, 60))
    with serve_app(stack_settings(tmp_path), store) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30
    ) as client:
        every = client.get("/api/deliveries").json()
        assert [(d["kind"], d["destination"], d["what"], d["state"]) for d in every] == [
            ("ehr", "http://ehr-a/fhir", "issued", "pending"), ("ehr", "http://ehr-b/fhir", "issued", "pending"),
            ("pacs", "PACS_A", "issued", "dead"), ("pacs", "PACS_B", "issued", "pending")]
        assert all("payload" not in d and d["report_id"] == report_id for d in every)  # the payload holds PHI
        assert [d["destination"] for d in client.get("/api/deliveries", params={"kind": "pacs"}).json()] == [
            "PACS_A", "PACS_B"]
        (dead,) = client.get("/api/dicom-exports", params={"state": "dead"}).json()
        assert (dead["id"], dead["destination_ae"], dead["attempts"]) == (pacs_job.id, "PACS_A", 1)
        assert "0xA700" in dead["last_error"]
        writebacks = client.get("/api/writebacks").json()
        assert [(w["upstream"], w["kind"], w["state"]) for w in writebacks] == [
            ("http://ehr-a/fhir", "create", "pending"), ("http://ehr-b/fhir", "create", "pending")]
        assert gauges(client) == {"medbridge_writeback_pending": 2, "medbridge_writeback_dead": 0,
                                  "medbridge_dicom_export_pending": 1, "medbridge_dicom_export_dead": 1}
        # the same backlog by destination, read from the store at scrape time
        text = client.get("/metrics").text
        assert 'medbridge_delivery_queue_depth{destination="PACS_A",kind="pacs",state="dead"} 1.0' in text
        assert 'medbridge_delivery_queue_depth{destination="http://ehr-a/fhir",kind="ehr",state="pending"} 1.0' in text

        wrong_route = client.post(f"/api/writebacks/{pacs_job.id}/replay")  # a PACS job is no writeback
        assert wrong_route.status_code == 404 and "GET /api/writebacks" in wrong_route.json()["detail"]
        pending = client.post(f"/api/deliveries/{writebacks[0]['id']}/replay")
        assert pending.status_code == 409 and "only a dead delivery can be replayed" in pending.json()["detail"]
        replayed = client.post(f"/api/deliveries/{pacs_job.id}/replay")
        assert replayed.status_code == 200, replayed.text
        assert (replayed.json()["state"], replayed.json()["attempts"]) == ("pending", 0)
        assert client.post("/api/deliveries/2147483648/replay").status_code == 404
        assert client.get("/api/deliveries", params={"kind": "fax"}).status_code == 422
        assert gauges(client)["medbridge_dicom_export_dead"] == 0
