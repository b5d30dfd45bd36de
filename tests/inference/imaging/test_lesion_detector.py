"""The demo lesion detector end to end: train (quick), load, score real images, explain with Grad-CAM."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import verify_metadata, verify_net_in_out
from PIL import Image
from pydicom.data import get_testdata_file

from inference.imaging.bundle import BundleError, load_bundle
from inference.imaging.model import FINDINGS, INTENDED_USE, METADATA_SCHEMA
from inference.imaging.operator import BundleOperator, ImagingResult
from inference.imaging.pixels import dataset_to_image
from inference.imaging.train import TRAIN_SOURCES, VALIDATION_SOURCES, insert_synthetic_lesion

# A held-out image: in VALIDATION_SOURCES, never in TRAIN_SOURCES.
HELD_OUT = "693_UNCR.dcm"


def _held_out_image() -> np.ndarray:
    assert HELD_OUT in VALIDATION_SOURCES and HELD_OUT not in TRAIN_SOURCES
    path = get_testdata_file(HELD_OUT, download=False)
    assert path is not None, "pydicom-data must be installed"
    return dataset_to_image(pydicom.dcmread(path))


def _lesion_cases() -> list[tuple[np.ndarray, tuple[int, int], float]]:
    """The held-out CT with bright/dark lesions at known places (radius 9 % of the width)."""
    image = _held_out_image()
    size = image.shape[1]
    radius = 0.09 * size  # training draws 7-10 % of the model input width
    cases = []
    rng = np.random.default_rng(123)
    for row_f, col_f, contrast in ((0.45, 0.35, 0.55), (0.6, 0.65, -0.55), (0.3, 0.6, 0.55)):
        center = (int(row_f * image.shape[0]), int(col_f * size))
        cases.append((insert_synthetic_lesion(image, center, radius, contrast, rng), center, radius))
    return cases


def test_the_bundle_carries_honest_metadata(trained_model: tuple[Path, dict[str, Any]]) -> None:
    folder, meta = trained_model
    assert json.loads((folder / "configs" / "metadata.json").read_text()) == meta
    bundle = load_bundle(folder, "cpu")
    assert bundle.name == meta["name"] == "medbridge-demo-lesion-densenet"
    assert bundle.findings == FINDINGS and bundle.task == "classification" and bundle.spatial_dims == 2
    assert meta["intended_use"] == INTENDED_USE and "not for clinical use" in meta["intended_use"]
    assert meta["version"].startswith("0.1.0+")
    trained = meta["medbridge"]
    assert set(trained["trained_on"]).isdisjoint(trained["validated_on"])
    # The quick schedule is far short of the full one; it must still be well above chance (0.5).
    assert trained["metrics"]["validation_accuracy"] >= 0.7
    assert trained["metrics"]["validation_auc"] >= 0.8
    assert not bundle.network.training


def test_the_demo_bundle_passes_monai_verify_metadata_and_verify_net_in_out(
    trained_model: tuple[Path, dict[str, Any]],
) -> None:
    folder, _ = trained_model
    meta_file, config_file = str(folder / "configs" / "metadata.json"), str(folder / "configs" / "inference.json")
    verify_metadata(meta_file=meta_file, filepath=str(METADATA_SCHEMA))  # offline: the schema is shipped
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, device="cpu")
    # and the checks can fail: a metadata file without network_data_format does not verify
    broken = json.loads(Path(meta_file).read_text())
    del broken["network_data_format"]
    bad = folder.parent / "broken-metadata.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(METADATA_SCHEMA))


def test_detects_lesion_on_held_out_image_and_not_without(detector: BundleOperator) -> None:
    clean = detector.run(_held_out_image())
    assert clean.probabilities[FINDINGS[0]] < 0.5
    for image, _center, _radius in _lesion_cases():
        assert detector.run(image).probabilities[FINDINGS[0]] > 0.5


def test_gradcam_peak_lies_near_the_lesion(detector: BundleOperator) -> None:
    size = detector.bundle.spatial_shape[0]
    for image, center, _radius in _lesion_cases():
        result = detector.run(image)
        assert result.heatmap.shape == (size, size)
        peak = np.unravel_index(int(np.argmax(result.heatmap)), result.heatmap.shape)
        # The held-out CT is square, so model-input pixels map linearly to image pixels.
        scale = size / image.shape[1]
        distance = np.hypot(peak[0] - center[0] * scale, peak[1] - center[1] * scale)
        assert distance <= 0.25 * size, (peak, center)


def test_result_pngs_are_colour_images_at_display_size(detector: BundleOperator) -> None:
    image, _, _ = _lesion_cases()[0]
    result = detector.run(image)
    assert isinstance(result, ImagingResult)
    for data in (result.heatmap_png, result.overlay_png):
        png = Image.open(io.BytesIO(data))
        assert png.format == "PNG" and png.mode == "RGB"
        assert max(png.size) == 512 and png.size[0] == png.size[1]
    heat = np.asarray(Image.open(io.BytesIO(result.heatmap_png)))
    assert heat.std() > 5, "the heatmap is not a flat colour"
    assert result.heatmap.dtype == np.float32
    assert 0.0 <= float(result.heatmap.min()) and float(result.heatmap.max()) <= 1.0


def test_the_heatmap_layer_is_grey_at_the_images_geometry_with_its_hot_spot_on_the_lesion(
    detector: BundleOperator,
) -> None:
    """The layer alone undoes the letterbox: square or not, it has the image's shape and its heat lies where
    the lesion is in the image (a viewer lays it on the rendered frame without knowing the model's input)."""
    base = _held_out_image()
    for image in (base, base[64:448, :], base[:, 96:416]):  # square, wide, tall
        h, w = image.shape
        center = (int(0.45 * h), int(0.35 * w))
        radius = 0.09 * max(h, w)
        lesioned = insert_synthetic_lesion(image, center, radius, 0.55, np.random.default_rng(7))
        png = Image.open(io.BytesIO(detector.run(lesioned).heatmap_layer_png))
        assert png.format == "PNG" and png.mode == "L" and png.size == (w, h)
        layer = np.asarray(png, dtype=np.float32)
        assert layer.max() == 255  # the peak is full heat
        peak = np.unravel_index(int(np.argmax(layer)), layer.shape)
        assert np.hypot(peak[0] - center[0], peak[1] - center[1]) <= 0.2 * max(h, w), (image.shape, peak, center)
        rows, cols = np.ogrid[:h, :w]
        on_lesion = np.hypot(rows - center[0], cols - center[1]) <= radius
        assert layer[on_lesion].mean() > 2 * layer[~on_lesion].mean(), image.shape


def test_run_dataset_reads_compressed_dicom(detector: BundleOperator) -> None:
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False)
    result = detector.run_dataset(pydicom.dcmread(path))
    probability = result.probabilities[FINDINGS[0]]
    assert 0.0 <= probability <= 1.0


def test_concurrent_calls_give_the_same_answer_as_serial_ones(detector: BundleOperator) -> None:
    cases = [image for image, _, _ in _lesion_cases()] + [_held_out_image()]
    serial = [detector.run(image).probabilities[FINDINGS[0]] for image in cases]
    results: dict[int, float] = {}

    def work(index: int) -> None:
        results[index] = detector.run(cases[index]).probabilities[FINDINGS[0]]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(cases))] == pytest.approx(serial, abs=1e-5)


def test_run_rejects_non_images(detector: BundleOperator) -> None:
    with pytest.raises(ValueError):
        detector.run(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        detector.run(np.full((8, 8), np.nan, dtype=np.float32))


def test_a_missing_bundle_raises_a_bundle_error_with_a_hint(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "demo-bundle"
    with pytest.raises(BundleError, match="medbridge train-demo-model") as info:
        load_bundle(missing, "cpu")
    assert "MEDBRIDGE_IMAGING_MODEL" in str(info.value)


def test_insert_synthetic_lesion_changes_only_the_disc() -> None:
    image = np.full((64, 64), 0.4, dtype=np.float32)
    out = insert_synthetic_lesion(image, (20, 40), 5.0, 0.3, np.random.default_rng(0))
    assert out[20, 40] > 0.6
    assert abs(float(out[60, 5]) - 0.4) < 1e-6
    assert torch.from_numpy(out).dtype == torch.float32
