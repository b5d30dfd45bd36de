"""A 3D classification bundle: a CT series sent over DICOM, routed to it by the registry (min_slices), assembled
into one volume along the slice normal and scored as a whole; the finding is recorded for the series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from inference.imaging.worker import analyse_study, registry_from_settings
from integration.db.store import Store
from integration.dicom.network.listener import DicomListener
from integration.events.publisher import QuietPeriodPublisher, announce_study
from tests.conftest import stack_settings
from tests.inference.imaging.test_bundle_registry import _write_bundle
from tests.inference.imaging.test_imaging_worker import _announced, _send
from tests.inference.imaging.volume_nets import BrightestVoxel

SHAPE = [4, 32, 32]  # slices, rows, columns the network takes


def _volume_classifier(folder: Path, name: str, preprocessing: dict[str, Any] | None) -> Path:
    """3D, two findings; with ``preprocessing`` its own Resized brings the volume to SHAPE, without it
    MedBridge resizes to the metadata's spatial_shape."""
    extra = {"preprocessing": preprocessing} if preprocessing is not None else None
    return _write_bundle(
        folder, name,
        {"_target_": "tests.inference.imaging.volume_nets.BrightestVoxel", "expects": SHAPE},
        {"num_channels": 1, "spatial_shape": SHAPE, "modality": "CT"},
        {"format": "classification", "num_channels": 2, "spatial_shape": [2],
         "channel_def": {"0": "dense_block", "1": "empty"}},
        weights=BrightestVoxel.weights(SHAPE), extra_config=extra)


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("volume-bundles")
    _volume_classifier(root / "own-resize", "ct-volume-own-resize", {"_target_": "Compose", "transforms": [
        {"_target_": "Resized", "keys": "image", "spatial_size": SHAPE, "mode": "trilinear"}]})
    _volume_classifier(root / "resized-by-medbridge", "ct-volume-resized", None)
    path = root / "models.yaml"
    path.write_text(
        "models:\n"
        "  - bundle: own-resize\n"
        "    route: {modalities: [CT], min_slices: 5}\n"
        "  - bundle: resized-by-medbridge\n"
        "    route: {modalities: [CT], min_slices: 5}\n")
    return path


def _ct_series(slices: int, block_on: range, study: str) -> list[Dataset]:
    """A CT series sent in reverse order (Instance Numbers agree with nothing): air (-1000 HU), with a 200 HU
    block on the slices ``block_on`` (counted from the lowest position)."""
    series = generate_uid()
    out = []
    for z in reversed(range(slices)):
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        hu = np.full((ds.Rows, ds.Columns), -1000, dtype=np.int16)
        if z in block_on:
            hu[30:90, 30:90] = 200
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = hu.tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = 1 + (7 * z) % slices
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_ct_series_gets_one_finding_from_a_3d_classifier_on_its_volume(
    store: Store, listener: DicomListener, models_file: Path, tmp_path: Path
) -> None:
    registry = registry_from_settings(stack_settings(tmp_path, models_file=models_file))
    study = generate_uid()
    dense = _ct_series(5, block_on=range(1, 4), study=study)
    empty = _ct_series(5, block_on=range(0), study=study)
    too_short = _ct_series(4, block_on=range(1, 4), study=study)  # below min_slices: no model routes to it
    _send(listener.port, *dense, *empty, *too_short)
    assert QuietPeriodPublisher(store, "study", 60, announce_study).publish_due() == 1
    (announced,) = _announced(store)

    analysis = analyse_study(store, registry, announced)

    assert analysis is not None
    event = analysis.event
    assert set(event.model_name.split(", ")) == {"ct-volume-own-resize", "ct-volume-resized"}
    # one finding per series, on its middle slice by position (slice 2 of 0..4), not one per image
    by_series = {f.series_instance_uid: f for f in event.findings}
    assert set(by_series) == {dense[0].SeriesInstanceUID, empty[0].SeriesInstanceUID}
    for series in (dense, empty):
        middle = next(ds for ds in series if ds.ImagePositionPatient[2] == 6.0)
        assert by_series[series[0].SeriesInstanceUID].sop_instance_uid == middle.SOPInstanceUID
    # both bundles (their own Resized, or MedBridge's resize to spatial_shape) saw the block in the CT window
    for name in ("dense_block", "ct-volume-resized:dense_block"):
        assert by_series[dense[0].SeriesInstanceUID].probabilities[name] > 0.9
        assert by_series[empty[0].SeriesInstanceUID].probabilities[name] < 0.1
    assert by_series[empty[0].SeriesInstanceUID].probabilities["empty"] > 0.9
    assert event.skipped_instances == len(too_short)
    assert all(f.heatmap_artifact_id is None for f in event.findings)  # no Grad-CAM for a volume
