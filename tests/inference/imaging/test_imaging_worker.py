"""The imaging worker over a real listener and store: a grown study's images are each inferred once, and
its heatmaps travel by artifact id: a report writer in another process, with its own data folder and only
the database in common, embeds them; the heatmap layer it stores lies on the frame DICOMweb renders, its heat
on the lesion, and the API names and serves it."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from inference.imaging.pixels import dataset_to_image
from inference.imaging.registry import ModelRegistry
from inference.imaging.train import insert_synthetic_lesion
from inference.imaging.worker import StudyRun, infer_study, read_member
from integration.db.artifacts import get_artifact
from integration.db.store import Store
from integration.db.tables import AiResult, OutboxEntry
from integration.dicom.network.listener import DicomListener
from integration.events.publisher import QuietPeriodPublisher, announce_study
from integration.fhir.storage import get_resource
from integration.reports.writer import imaging_report, write_report
from schemas.events import ImagingInferenceCompleted, StudyReceived
from tests import authorized
from tests.conftest import REPO, serve_app, stack_settings

CT_SMALL = get_testdata_file("CT_small.dcm")


def _send(port: int, *datasets, status: int = 0x0000) -> None:  # noqa: ANN002
    """The data sets on one association, each answered with ``status``."""
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    try:
        assert [assoc.send_c_store(ds).Status for ds in datasets] == [status] * len(datasets)
    finally:
        assoc.release()


def _announced(store: Store) -> list[StudyReceived]:
    with store.session() as s:
        rows = s.scalars(select(OutboxEntry).where(OutboxEntry.event_type == "StudyReceived").order_by(OutboxEntry.id))
        return [StudyReceived.model_validate_json(row.payload) for row in rows]


def _copy_in_study(first, series_uid: str):  # noqa: ANN001, ANN202 - another instance of the same study
    ds = dcmread(CT_SMALL)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = first.StudyInstanceUID
    return ds


def _announce_first(store: Store, listener: DicomListener):  # noqa: ANN202
    """CT_small sent and its study announced (revision 1); the publisher and the data set."""
    publisher = QuietPeriodPublisher(store, "study", 60, announce_study)
    first = dcmread(CT_SMALL)
    _send(listener.port, first)
    assert publisher.publish_due() == 1
    return publisher, first


def test_each_revision_infers_the_images_it_brought_and_a_replay_infers_the_same(
    store: Store, listener: DicomListener, registry: ModelRegistry
) -> None:
    publisher, first = _announce_first(store, listener)
    # the study grows: a new series on a later association, two images
    later = [_copy_in_study(first, generate_uid()) for _ in range(2)]
    later[1].SeriesInstanceUID = later[0].SeriesInstanceUID
    _send(listener.port, *later)
    assert publisher.publish_due() == 1

    revision1, revision2 = _announced(store)
    assert revision2.revision > revision1.revision
    assert (revision1.instance_count, revision2.instance_count) == (1, 3)
    result1 = infer_study(store, registry, revision1)
    result2 = infer_study(store, registry, revision2)
    assert result1 is not None and result2 is not None
    assert [f.sop_instance_uid for f in result1.findings] == [first.SOPInstanceUID]
    assert sorted(f.sop_instance_uid for f in result2.findings) == sorted(ds.SOPInstanceUID for ds in later)
    assert (result1.earlier_images, result2.earlier_images) == (0, 1)
    # at-least-once delivery: revision 1 redelivered after revision 2 is announced infers what it did
    again = infer_study(store, registry, revision1)
    assert again is not None and [f.sop_instance_uid for f in again.findings] == [first.SOPInstanceUID]
    # the grown revision's report says its images are the new ones
    report, details = imaging_report(result2)
    assert "received since this study's previous report" in report["conclusion"]
    assert len(details["instances"]) == 2
    first_report, _ = imaging_report(result1)
    assert "previous report" not in first_report["conclusion"]


def test_a_revision_that_brings_no_image_has_nothing_to_infer(
    store: Store, listener: DicomListener, registry: ModelRegistry
) -> None:
    publisher, first = _announce_first(store, listener)
    # the same instance again: a duplicate, the study does not grow, nothing is announced
    _send(listener.port, first, status=0xB000)
    assert publisher.publish_due() == 0
    (revision1,) = _announced(store)
    # a later revision whose instances are all announced already (as a non-image-only one would be)
    later = revision1.model_copy(update={"revision": revision1.revision + 1, "event_id": "e-later"})
    assert infer_study(store, registry, later) is None


# The report writer as a process of its own: another working folder and data folder, only the database URL in
# common with the imaging worker (as a worker on another host has). It reads the event as the broker would
# deliver it (JSON) on stdin and prints the report id.
_REMOTE_WRITER = """
import sys
from integration.db.store import Store
from integration.reports.writer import write_report
from schemas.events import parse_event

store = Store(sys.argv[1])
store.start()
try:
    print(write_report(store, parse_event(sys.stdin.read())))
finally:
    store.stop()
"""


def _write_report_elsewhere(database_url: str, event: ImagingInferenceCompleted, folder: Path) -> str:
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDBRIDGE_DATA_DIR": str(folder / "var")}
    proc = subprocess.run([sys.executable, "-c", _REMOTE_WRITER, database_url], input=event.model_dump_json(),
                          capture_output=True, text=True, cwd=folder, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_a_report_writer_in_another_process_with_another_data_folder_embeds_the_heatmap(
    store: Store, listener: DicomListener, registry: ModelRegistry, tmp_path: Path
) -> None:
    _announce_first(store, listener)
    (announced,) = _announced(store)
    result = infer_study(store, registry, announced)
    assert result is not None and result.schema_version == 2
    (finding,) = result.findings
    heatmap_id = finding.heatmap_artifact_id
    assert heatmap_id is not None
    # the overlay is in the store under the sha256 of its bytes, and nowhere on this host's disk
    stored = get_artifact(store, heatmap_id)
    assert stored.media_type == "image/png" and stored.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert hashlib.sha256(stored.data).hexdigest() == heatmap_id
    assert list(tmp_path.rglob("*.png")) == []

    report_id = _write_report_elsewhere(store.url, result, tmp_path / "writer-host")

    report = get_resource(store, "DiagnosticReport", report_id)
    (form,) = report["presentedForm"]
    assert form["contentType"] == "image/png"
    assert hashlib.sha256(base64.b64decode(form["data"])).hexdigest() == heatmap_id
    with store.session() as s:
        details = s.get(AiResult, report_id).details
    assert [i["heatmap_artifact_id"] for i in details["instances"]] == [heatmap_id]
    assert "heatmap_path" not in json.dumps(details)



def _lesioned_ct(center: tuple[int, int], radius: float) -> Dataset:
    """A held-out CT of the demo model (pydicom's 693_UNCR), cropped to 384 rows x 512 columns (not square, so
    the model letterboxes it) with a bright synthetic lesion at ``center``; stored as 12-bit grey, no window."""
    ds = dcmread(get_testdata_file("693_UNCR.dcm"))
    image = dataset_to_image(ds)[64:448, :]
    image = insert_synthetic_lesion(image, center, radius, 0.55, np.random.default_rng(7))
    ds.PixelData = (image * 4095.0).round().astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    for keyword in ("WindowCenter", "WindowWidth", "SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def test_the_heatmap_layer_lies_on_the_rendered_frame_with_its_heat_on_the_lesion_and_the_api_serves_it(
    store: Store, listener: DicomListener, registry: ModelRegistry, tmp_path: Path
) -> None:
    center, radius = (172, 179), 46.0  # (row, column) in the 384 x 512 image
    ds = _lesioned_ct(center, radius)
    publisher = QuietPeriodPublisher(store, "study", 60, announce_study)
    _send(listener.port, ds)
    assert publisher.publish_due() == 1
    (announced,) = _announced(store)
    result = infer_study(store, registry, announced)
    assert result is not None
    (finding,) = result.findings
    assert finding.heatmap_layer_artifact_id is not None
    assert finding.heatmap_layer_artifact_id != finding.heatmap_artifact_id
    report_id = write_report(store, result)

    with serve_app(stack_settings(tmp_path), store) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30
    ) as api:
        (instance,) = api.get(f"/api/reports/{report_id}").json()["instances"]
        assert instance["heatmap_layer_artifact_id"] == finding.heatmap_layer_artifact_id
        served = api.get(f"/api/artifacts/{instance['heatmap_layer_artifact_id']}")
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        frame = api.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                        f"{ds.SOPInstanceUID}/rendered", headers={"Accept": "image/png"})
        assert frame.status_code == 200

    layer_png, frame_png = Image.open(io.BytesIO(served.content)), Image.open(io.BytesIO(frame.content))
    # the layer is the frame's geometry pixel for pixel: no letterbox left to undo
    assert layer_png.mode == "L" and layer_png.size == frame_png.size == (512, 384)
    layer = np.asarray(layer_png, dtype=np.float32)
    peak = np.unravel_index(int(np.argmax(layer)), layer.shape)
    assert np.hypot(peak[0] - center[0], peak[1] - center[1]) <= 0.2 * 512, (peak, center)
    rows, cols = np.ogrid[:384, :512]
    on_lesion = np.hypot(rows - center[0], cols - center[1]) <= radius
    assert layer[on_lesion].mean() > 2 * layer[~on_lesion].mean()


def test_a_file_is_read_once_an_image_gone_before_its_pixels_are_read_is_skipped_the_top_explained_from_memory(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    """The header routing reads is what the image is decoded from (its pixel data read from the file then, and
    left there again); a series no larger than the explained top is explained from the images kept from scoring,
    without reading their files again."""
    series = generate_uid()
    members = []
    for i in range(2):
        ds = dcmread(CT_SMALL)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(tmp_path / f"{i}.dcm")
        members.append(read_member(ds.SOPInstanceUID, series, str(tmp_path / f"{i}.dcm")))
    kept, gone = members
    (tmp_path / "1.dcm").unlink()  # after routing read its header, before its pixels were read

    run = StudyRun(explain_top=2)
    run.classify_series(members, registry.operators)
    assert run.skipped == [gone.sop_instance_uid]
    assert list(run.probabilities) == [kept.sop_instance_uid]
    assert kept.header.get_item("PixelData", keep_deferred=True).value is None  # not held in memory

    (tmp_path / "0.dcm").unlink()
    stored: list[bytes] = []
    heatmaps = run.explanations(lambda png: stored.append(png) or str(len(stored)))
    assert heatmaps == {kept.sop_instance_uid: ("1", "2")}
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in stored)
