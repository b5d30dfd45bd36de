"""Explanation maps on demand through the real API, on SQLite and PostgreSQL: asking publishes one event through
the outbox however often a reviewer asks, the worker's answer is recorded against the result so the report's
detail names it, and what cannot be asked for is refused with an OperationOutcome saying why."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from integration.db.artifacts import put_artifact
from integration.db.store import Store
from integration.db.tables import OutboxEntry
from integration.reports.explanations import ExplanationRecord
from integration.reports.writer import write_report
from schemas.events import TOPIC_EXPLANATION_REQUESTED, ExplanationRequested, ImagingInferenceCompleted, InstanceFinding
from tests import authorized
from tests.conftest import serve_app, stack_settings

TOP, OTHER, UNEXPLAINABLE = "1.2.3.1", "1.2.3.2", "1.2.3.3"


def _stored(store: Store, colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    with store.session() as s:
        return put_artifact(s, buffer.getvalue(), "image/png")


def _finding(sop: str, p: float, heatmap: str | None = None, explainable: bool | None = True) -> InstanceFinding:
    return InstanceFinding(sop_instance_uid=sop, series_instance_uid="1.2.3.9",
                           probabilities={"synthetic_round_lesion": p}, heatmap_artifact_id=heatmap,
                           heatmap_layer_artifact_id=heatmap, explainable=explainable)


@pytest.fixture
def report(store: Store) -> tuple[str, str]:
    """An imaging report whose top image has its heatmap, the next none, the third a model that explains
    nothing; (report id, the top image's heatmap id)."""
    heat = _stored(store, (255, 0, 0))
    event = ImagingInferenceCompleted(
        source_event_id="study-event", study_instance_uid="1.2.3", revision=1, patient_ref=None,
        imaging_study_ref=None, model_name="demo-lesion-densenet", model_version="0.1.0",
        findings=[_finding(TOP, 0.9, heat), _finding(OTHER, 0.4), _finding(UNEXPLAINABLE, 0.2, explainable=False)])
    return write_report(store, event), heat


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    with serve_app(stack_settings(tmp_path), store) as port, httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30, headers=authorized.headers("reviewer")
    ) as client:
        yield client


def _requests(store: Store) -> list[ExplanationRequested]:
    with store.session() as s:
        rows = s.scalars(select(OutboxEntry).where(OutboxEntry.topic == TOPIC_EXPLANATION_REQUESTED)
                         .order_by(OutboxEntry.id))
        return [ExplanationRequested.model_validate_json(r.payload) for r in rows]


def _path(report_id: str, sop: str) -> str:
    return f"/api/reports/{report_id}/images/{sop}/explanation"


def test_asking_twice_publishes_one_request_and_the_workers_answer_is_what_every_later_view_shows(
        api: httpx.Client, store: Store, report: tuple[str, str]) -> None:
    report_id, _ = report
    first = api.post(_path(report_id, OTHER))
    assert first.status_code == 202 and first.json()["state"] == "pending"
    again = api.post(_path(report_id, OTHER))
    assert again.status_code == 202 and again.json()["state"] == "pending"
    (asked,) = _requests(store)  # the second ask published nothing: the worker renders it once
    assert (asked.report_id, asked.sop_instance_uid, asked.study_instance_uid, asked.series_instance_uid) == (
        report_id, OTHER, "1.2.3", "1.2.3.9")
    assert api.get(_path(report_id, OTHER)).json()["state"] == "pending"
    assert api.get(f"/api/reports/{report_id}").json()["instances"][1]["explanation"] == "pending"

    overlay, layer = _stored(store, (0, 255, 0)), _stored(store, (0, 0, 255))
    with store.session() as s:  # the imaging worker's outcome, as its consumer writes it
        ExplanationRecord(report_id, OTHER, overlay, layer).write(s)
    ready = api.get(_path(report_id, OTHER)).json()
    assert (ready["state"], ready["heatmap_artifact_id"], ready["heatmap_layer_artifact_id"]) == (
        "ready", overlay, layer)
    other = api.get(f"/api/reports/{report_id}").json()["instances"][1]
    assert (other["has_heatmap"], other["heatmap_artifact_id"], other["heatmap_layer_artifact_id"]) == (
        True, overlay, layer)
    cached = api.post(_path(report_id, OTHER))
    assert cached.status_code == 200 and cached.json()["heatmap_artifact_id"] == overlay
    assert len(_requests(store)) == 1


def test_an_image_with_its_heatmap_is_ready_without_asking_the_worker(
        api: httpx.Client, store: Store, report: tuple[str, str]) -> None:
    report_id, heat = report
    r = api.post(_path(report_id, TOP))
    assert r.status_code == 200 and r.json()["state"] == "ready" and r.json()["heatmap_artifact_id"] == heat
    assert _requests(store) == []


def test_a_failure_is_shown_with_its_reason_and_asking_again_asks_anew(
        api: httpx.Client, store: Store, report: tuple[str, str]) -> None:
    report_id, _ = report
    assert api.post(_path(report_id, OTHER)).status_code == 202
    with store.session() as s:
        ExplanationRecord(report_id, OTHER, reason="the image could not be decoded").write(s)
    failed = api.get(_path(report_id, OTHER)).json()
    assert (failed["state"], failed["reason"]) == ("failed", "the image could not be decoded")
    assert api.post(_path(report_id, OTHER)).json()["state"] == "pending"
    assert len(_requests(store)) == 2


def test_a_request_the_worker_dead_lettered_is_failed_not_pending_for_ever(
        api: httpx.Client, store: Store, report: tuple[str, str]) -> None:
    report_id, _ = report
    assert api.post(_path(report_id, OTHER)).status_code == 202
    (asked,) = _requests(store)
    store.record_dead_letter("imaging-worker", TOPIC_EXPLANATION_REQUESTED, asked.event_id,
                             "RuntimeError: out of memory", asked.model_dump_json().encode())
    failed = api.get(_path(report_id, OTHER)).json()
    assert failed["state"] == "failed" and "out of memory" in failed["reason"]
    assert api.post(_path(report_id, OTHER)).status_code == 202  # asked anew
    assert len(_requests(store)) == 2


def test_what_cannot_be_asked_for_is_refused_with_an_operation_outcome(
        api: httpx.Client, store: Store, report: tuple[str, str]) -> None:
    report_id, _ = report
    refused = api.post(_path(report_id, UNEXPLAINABLE))
    assert refused.status_code == 409 and refused.json()["resourceType"] == "OperationOutcome"
    assert "renders no explanation map" in refused.json()["issue"][0]["diagnostics"]
    for path in (_path("no-such-report", OTHER), _path(report_id, "9.9.9")):
        missing = api.post(path)
        assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome", path
    never_asked = api.get(_path(report_id, OTHER))
    assert never_asked.status_code == 404 and "POST" in never_asked.json()["issue"][0]["diagnostics"]
    # asking makes the worker compute: the reviewer role; reading where it stands needs only read access
    integration = authorized.headers("integration")
    assert api.post(_path(report_id, OTHER), headers=integration).status_code == 403
    assert _requests(store) == []
