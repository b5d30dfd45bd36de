"""Heatmaps by reference: the report writer and the API read them from the artifact store by id, and an event
can never make them read a file, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from integration.db.artifacts import artifact_id, get_artifact, put_artifact, stored_artifact_ids
from integration.db.store import Store
from integration.db.tables import AiResult
from integration.fhir.storage import get_resource
from integration.reports.legacy_heatmaps import adopt_heatmap_files, legacy_heatmap_folder
from integration.reports.writer import write_report
from schemas.events import ImagingInferenceCompleted, InstanceFinding, parse_event
from tests import authorized
from tests.conftest import serve_app, stack_settings


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _stored(store: Store, png: bytes) -> str:
    with store.session() as s:
        return put_artifact(s, png, "image/png")


def _result(*findings: tuple[float, str | None], layers: tuple[str | None, ...] = ()) -> ImagingInferenceCompleted:
    """An imaging result with one finding per (probability, heatmap artifact id), the n-th with heatmap layer
    ``layers[n]`` when given."""
    return ImagingInferenceCompleted(
        source_event_id="study-event", study_instance_uid="1.2.3", revision=1, patient_ref=None,
        imaging_study_ref=None, model_name="demo-lesion-densenet", model_version="0.1.0",
        findings=[InstanceFinding(sop_instance_uid=f"1.2.3.{n}", series_instance_uid="1.2.3.9",
                                  probabilities={"synthetic_round_lesion": p}, heatmap_artifact_id=aid,
                                  heatmap_layer_artifact_id=layers[n] if n < len(layers) else None)
                  for n, (p, aid) in enumerate(findings)],
    )


def _details(store: Store, report_id: str) -> dict:
    with store.session() as s:
        return s.get(AiResult, report_id).details


# the report writer ----------------------------------------------------------------------------
def test_the_report_embeds_the_highest_ranked_findings_heatmap_from_the_store(store: Store) -> None:
    low, high = _png((0, 0, 255)), _png((255, 0, 0))
    low_id, high_id = _stored(store, low), _stored(store, high)
    report_id = write_report(store, _result((0.2, low_id), (0.9, high_id)))
    (form,) = get_resource(store, "DiagnosticReport", report_id)["presentedForm"]
    assert form["contentType"] == "image/png" and base64.b64decode(form["data"]) == high
    assert [i["heatmap_artifact_id"] for i in _details(store, report_id)["instances"]] == [high_id, low_id]


def test_a_version_1_event_naming_a_file_is_reported_without_reading_it(store: Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png((1, 2, 3)))
    payload = json.loads(_result((0.9, None)).model_dump_json())
    payload["schema_version"] = 1
    payload["findings"][0].pop("heatmap_artifact_id")
    payload["findings"][0]["heatmap_path"] = str(secret)
    event = parse_event(json.dumps(payload))
    report_id = write_report(store, event)
    assert "presentedForm" not in get_resource(store, "DiagnosticReport", report_id)
    (instance,) = _details(store, report_id)["instances"]
    assert instance["heatmap_artifact_id"] is None and "heatmap_path" not in instance


@pytest.mark.parametrize("value", ["../../etc/passwd", "/etc/passwd", "A" * 64, "a" * 63, "a" * 64 + "\n",
                                   "file:///" + "a" * 64])
def test_an_event_whose_artifact_id_is_not_a_sha256_does_not_parse(value: str) -> None:
    payload = json.loads(_result((0.9, None)).model_dump_json())
    payload["findings"][0]["heatmap_artifact_id"] = value
    with pytest.raises(ValidationError, match="heatmap_artifact_id"):  # the consumer dead-letters it at once
        parse_event(json.dumps(payload))


def test_an_event_naming_an_artifact_the_store_lacks_is_reported_without_it_and_logged(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    known = _stored(store, _png((0, 255, 0)))
    unknown = "0" * 64
    event = _result((0.9, unknown), (0.5, known))
    with caplog.at_level(logging.WARNING, logger="integration.reports.writer"):
        report_id = write_report(store, event)
    assert f"event {event.event_id} names 1 heatmap artifact(s) the store does not hold" in caplog.text
    # the top finding's heatmap is unknown: no presentedForm; the details name only what the store holds
    assert "presentedForm" not in get_resource(store, "DiagnosticReport", report_id)
    assert [i["heatmap_artifact_id"] for i in _details(store, report_id)["instances"]] == [None, known]


# the API ----------------------------------------------------------------------------------------
@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    with serve_app(stack_settings(tmp_path), store) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30
    ) as client:
        yield client


def test_the_api_serves_an_artifact_by_id_with_its_media_type(api: httpx.Client, store: Store) -> None:
    png = _png((255, 0, 0))
    aid = _stored(store, png)
    r = api.get(f"/api/artifacts/{aid}")
    assert r.status_code == 200 and r.content == png
    assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
    assert "immutable" in r.headers["cache-control"] and "private" in r.headers["cache-control"]
    missing = api.get(f"/api/artifacts/{'0' * 64}")
    assert missing.status_code == 404 and "is not in the store" in missing.json()["detail"]
    for bad in ("A" * 64, "a" * 63, "a" * 65, "not-an-id"):
        r = api.get(f"/api/artifacts/{bad}")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "artifact_id"], bad
    for traversal in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..%2Fstore.db"):
        assert api.get(f"/api/artifacts/{traversal}").status_code in (404, 422), traversal


def test_the_viewers_heatmap_route_serves_the_reports_artifact(api: httpx.Client, store: Store) -> None:
    png = _png((255, 0, 0))
    aid = _stored(store, png)
    report_id = write_report(store, _result((0.9, aid), (0.1, None)))
    detail = api.get(f"/api/reports/{report_id}").json()
    assert [(i["has_heatmap"], i["heatmap_artifact_id"]) for i in detail["instances"]] == [(True, aid), (False, None)]
    image = api.get(f"/api/reports/{report_id}/image.png")
    assert image.status_code == 200 and image.content == png and image.headers["content-type"] == "image/png"
    without = api.get(f"/api/reports/{report_id}/image.png", params={"sop_instance_uid": "1.2.3.1"})
    assert without.status_code == 404 and without.json()["detail"] == "this report has no image"


def _grey_png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_api_names_each_images_heatmap_layer_and_serves_it(api: httpx.Client, store: Store) -> None:
    overlay, layer = _png((255, 0, 0)), _grey_png(200)
    overlay_id, layer_id = _stored(store, overlay), _stored(store, layer)
    unknown = artifact_id(_grey_png(7))  # named by the event, never stored: the report goes without it
    report_id = write_report(store, _result((0.9, overlay_id), (0.5, overlay_id), (0.1, None),
                                            layers=(layer_id, unknown)))
    detail = api.get(f"/api/reports/{report_id}").json()
    assert [(i["heatmap_artifact_id"], i["heatmap_layer_artifact_id"]) for i in detail["instances"]] == [
        (overlay_id, layer_id), (overlay_id, None), (None, None)]
    served = api.get(f"/api/artifacts/{layer_id}")
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(served.content)).mode == "L" and served.content == layer


def test_an_event_from_before_the_layer_still_parses_and_its_report_keeps_the_overlay(store: Store) -> None:
    overlay_id = _stored(store, _png((0, 255, 0)))
    payload = json.loads(_result((0.8, overlay_id)).model_dump_json())
    payload["findings"][0].pop("heatmap_layer_artifact_id")  # as a worker before the layer wrote it
    event = parse_event(json.dumps(payload))
    report_id = write_report(store, event)
    (instance,) = _details(store, report_id)["instances"]
    assert instance["heatmap_artifact_id"] == overlay_id and instance["heatmap_layer_artifact_id"] is None


# results from before artifacts --------------------------------------------------------------------
def test_results_from_before_artifacts_get_their_heatmap_files_as_artifacts_and_no_other_file(
    store: Store, tmp_path: Path
) -> None:
    data_dir = tmp_path / "var"
    folder = legacy_heatmap_folder(data_dir) / "study-hash"
    folder.mkdir(parents=True)
    kept = _png((255, 0, 0))
    (folder / "1.2.3.0.png").write_bytes(kept)
    outside = tmp_path / "elsewhere.png"  # a path out of the legacy folder, even through "..", is never read
    outside.write_bytes(_png((1, 2, 3)))
    legacy = [str(folder / "1.2.3.0.png"), str(folder / ".." / ".." / ".." / ".." / "elsewhere.png"),
              str(folder / "gone.png"), None]
    with store.session() as s:
        s.add(AiResult(report_id="old", kind="imaging", source_event_id="e-old", details={
            "model_name": "demo", "instances": [{"sop_instance_uid": f"1.2.3.{n}", "probabilities": {"x": 0.5},
                                                 "heatmap_path": path} for n, path in enumerate(legacy)]}))
        s.add(AiResult(report_id="new", kind="imaging", source_event_id="e-new", details={"instances": []}))

    assert adopt_heatmap_files(store, data_dir) == 1
    details = _details(store, "old")
    assert details["model_name"] == "demo" and "heatmap_path" not in json.dumps(details)
    ids = [i["heatmap_artifact_id"] for i in details["instances"]]
    assert ids == [artifact_id(kept), None, None, None]
    assert get_artifact(store, ids[0]).data == kept
    assert stored_artifact_ids(store, [artifact_id(outside.read_bytes())]) == set()
    assert adopt_heatmap_files(store, data_dir) == 0  # done once
