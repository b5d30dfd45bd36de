"""Bring-your-own models: MONAI bundles the test builds (tiny networks with their own inference.json), loaded
through the registry file, routed by series (a CT series to a 3D segmentation bundle, a CR image to a 2D
classifier), and bad bundles refused at start-up with their name and what to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from inference.imaging.bundle import BundleError, load_bundle
from inference.imaging.registry import (
    ModelsFileError,
    SeriesInfo,
    load_registry,
    read_models_file,
)
from inference.imaging.volume import assemble_volume
from inference.imaging.worker import analyse_study, registry_from_settings
from integration.db.store import Store
from integration.dicom.network.listener import DicomListener
from integration.events.publisher import QuietPeriodPublisher, announce_study
from tests.conftest import stack_settings
from tests.inference.imaging.test_imaging_worker import _announced, _send

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_TENSOR = {"type": "image", "format": "magnitude", "dtype": "float32", "value_range": [0, 1],
           "is_patch_data": False}


def _write_bundle(folder: Path, name: str, network_def: dict[str, Any], inputs: dict[str, Any],
                  outputs: dict[str, Any], weights: dict[str, torch.Tensor] | None = None,
                  extra_config: dict[str, Any] | None = None) -> Path:
    """A bundle folder; the weights are the network's own initial ones unless given."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    meta = {"name": name, "version": "1.0.0",
            "network_data_format": {"inputs": {"image": {**_TENSOR, **inputs}},
                                    "outputs": {"pred": {**_TENSOR, **outputs}}}}
    config = {"network_def": network_def, **(extra_config or {})}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    if weights is None:
        weights = ConfigParser(config).get_parsed_content("network_def").state_dict()
    torch.save(weights, folder / "models" / "model.pt")
    return folder


def _ct_segmenter(folder: Path) -> Path:
    """3D, two channels: a 1x1x1 convolution whose label 1 is a voxel brighter than half the CT window."""
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 10.0
        conv.bias[1] = -5.0
    return _write_bundle(
        folder, "tiny-ct-segmenter", {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2,
                                      "kernel_size": 1},
        {"num_channels": 1, "spatial_shape": ["*", "*", "*"], "modality": "CT"},
        {"format": "segmentation", "num_channels": 2, "spatial_shape": ["*", "*", "*"],
         "channel_def": {"0": "background", "1": "dense_block"}},
        weights=conv.state_dict())


def _cr_classifier(folder: Path) -> Path:
    """2D, 16x16 input, two findings, with its own preprocessing transforms from inference.json."""
    return _write_bundle(
        folder, "tiny-cr-classifier",
        {"_target_": "monai.networks.nets.Classifier", "in_shape": [1, 16, 16], "classes": 2, "channels": [4],
         "strides": [2]},
        {"num_channels": 1, "spatial_shape": [16, 16], "modality": "CR"},
        {"format": "classification", "num_channels": 2, "spatial_shape": [2],
         "channel_def": {"0": "cardiomegaly", "1": "effusion"}},
        extra_config={"preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Resized", "keys": "image", "spatial_size": [16, 16]}]}})


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    _ct_segmenter(root / "ct-seg")
    _cr_classifier(root / "cr-cls")
    path = root / "models.yaml"
    path.write_text(
        "models:\n"
        "  - bundle: ct-seg\n"
        "    route: {modalities: [CT], min_slices: 3}\n"
        "  - bundle: cr-cls\n"
        "    route: {modalities: [CR, DX], series_description: '(?i)chest'}\n")
    return path


def _ct_slices(count: int) -> list[Dataset]:
    """A CT series out of order: slice z has a bright (200 HU) block in air (-1000 HU)."""
    series, study = generate_uid(), generate_uid()
    slices = []
    for z in (2, 0, 1)[:count]:
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        hu = np.full((ds.Rows, ds.Columns), -1000, dtype=np.int16)
        hu[20 + 10 * z: 60, 30:90] = 200
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = hu.tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = 10 - z  # disagrees with the positions: the positions win
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        slices.append(ds)
    return slices


def _cr_image(study_uid: str) -> Dataset:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality, ds.SeriesDescription, ds.BodyPartExamined = "CR", "Chest PA", "CHEST"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def test_a_series_is_assembled_along_the_slice_normal_with_spacing_from_the_headers() -> None:
    slices = _ct_slices(3)
    volume = assemble_volume(slices)
    by_z = sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert volume.sop_instance_uids == [ds.SOPInstanceUID for ds in by_z]
    assert volume.voxels.shape == (3, 128, 128) and volume.spacing[0] == pytest.approx(2.5)
    assert volume.voxels[0, 25, 40] == 200 and volume.voxels[2, 25, 40] == -1000  # HU, slice 0 lowest


def test_routing_rules_choose_the_models_for_each_series(models_file: Path) -> None:
    registry = load_registry(read_models_file(models_file), "cpu")
    names = lambda info: [op.model_name for op in registry.route(info)]  # noqa: E731
    ct = SeriesInfo("CT", "ABDOMEN", "1.2.840.10008.5.1.4.1.1.2", "", 40)
    assert names(ct) == ["tiny-ct-segmenter"]
    assert names(SeriesInfo("CT", "", "", "", 2)) == []  # fewer slices than the rule's minimum
    assert names(SeriesInfo("DX", "CHEST", CR_STORAGE, "CHEST AP portable", 1)) == ["tiny-cr-classifier"]
    assert names(SeriesInfo("DX", "HAND", CR_STORAGE, "hand", 1)) == []  # description does not match


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_ct_series_and_a_cr_image_of_one_study_go_to_different_models(
    store: Store, listener: DicomListener, models_file: Path, tmp_path: Path
) -> None:
    registry = registry_from_settings(stack_settings(tmp_path, models_file=models_file))
    ct = _ct_slices(3)
    cr = _cr_image(ct[0].StudyInstanceUID)
    _send(listener.port, *ct)
    _send(listener.port, cr)
    assert QuietPeriodPublisher(store, "study", 60, announce_study).publish_due() == 1
    (announced,) = _announced(store)

    analysis = analyse_study(store, registry, announced)

    assert analysis is not None
    (finding,) = analysis.event.findings  # the CR image, scored by the classifier
    assert finding.sop_instance_uid == cr.SOPInstanceUID
    assert set(finding.probabilities) == {"cardiomegaly", "effusion"}
    assert all(0.0 <= p <= 1.0 for p in finding.probabilities.values())
    assert finding.heatmap_artifact_id is None  # the bundle asks for no explanation map
    assert set(analysis.event.model_name.split(", ")) == {"tiny-cr-classifier", "tiny-ct-segmenter"}
    (seg,) = analysis.segmentations  # the CT series, segmented as one volume
    assert seg.model_name == "tiny-ct-segmenter" and seg.labels == {1: "dense_block"}
    by_z = sorted(ct, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert seg.source_sop_instance_uids == [ds.SOPInstanceUID for ds in by_z]
    assert seg.label_map.shape == (3, 128, 128) and seg.label_map.dtype == np.uint8
    for z in range(3):  # the bright block, which starts lower on each higher slice, is label 1 and only it
        expected = np.zeros((128, 128), dtype=np.uint8)
        expected[20 + 10 * z: 60, 30:90] = 1
        assert np.array_equal(seg.label_map[z], expected), z
    (recorded,) = analysis.event.segmentations  # its DICOM SEG stored and named in the event for the report
    assert recorded.model_name == "tiny-ct-segmenter" and len(recorded.segments) == 1
    assert recorded.segments[0].volume_ml > 0


def _broken(tmp_path: Path, how: str) -> Path:
    folder = _cr_classifier(tmp_path / f"bundle-{how}")
    if how == "missing-config":
        (folder / "configs" / "inference.json").unlink()
    elif how == "malformed-config":
        (folder / "configs" / "inference.json").write_text('{"network_def": {"_target_": ')
    elif how == "wrong-weights":
        torch.save(torch.nn.Conv2d(1, 3, 3).state_dict(), folder / "models" / "model.pt")
    elif how == "no-weights":
        (folder / "models" / "model.pt").unlink()
    return folder


@pytest.mark.parametrize(("how", "message"), [
    ("missing-config", "configs/inference.json is missing"),
    ("malformed-config", "configs/inference.json is not valid JSON"),
    ("wrong-weights", "models/model.pt does not fit network_def"),
    ("no-weights", "models/model.pt (or model.ts) is missing"),
])
def test_a_bad_bundle_stops_start_up_with_its_name_and_what_to_fix(tmp_path: Path, how: str, message: str) -> None:
    folder = _broken(tmp_path, how)
    (tmp_path / "models.json").write_text(json.dumps({"models": [{"bundle": str(folder)}]}))
    with pytest.raises(BundleError) as info:
        registry_from_settings(stack_settings(tmp_path, models_file=tmp_path / "models.json"))
    assert str(folder) in str(info.value) and message in str(info.value)


def test_a_malformed_models_file_is_refused_with_what_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - bundle: x\n    route: {modality: CT}\n")
    with pytest.raises(ModelsFileError, match="unknown keys"):
        read_models_file(path)
    with pytest.raises(ModelsFileError, match="does not exist"):
        read_models_file(tmp_path / "absent.yaml")


def test_a_bundle_loads_on_its_own_with_its_labels(tmp_path: Path) -> None:
    bundle = load_bundle(_cr_classifier(tmp_path / "cr"), "cpu")
    assert bundle.findings == ("cardiomegaly", "effusion") and bundle.spatial_dims == 2
    assert bundle.preprocessing is not None and bundle.explain_method is None


def test_a_bundles_activation_postprocessing_gives_the_same_probabilities_on_a_whole_batch(tmp_path: Path) -> None:
    """Activationsd alone is applied to the batch at once; any other postprocessing still runs row by row."""
    from inference.imaging.operator import BundleOperator

    post = {"_target_": "Compose", "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]}
    folder = _cr_classifier(tmp_path / "cr")
    config = json.loads((folder / "configs" / "inference.json").read_text())
    (folder / "configs" / "inference.json").write_text(json.dumps({**config, "postprocessing": post}))
    op = BundleOperator(load_bundle(folder, "cpu"))
    images = [np.random.default_rng(seed).random((40, 30), dtype=np.float32) for seed in range(5)]
    batched = op.classify(images)
    inputs = torch.stack([op.model_input(image) for image in images])
    logits = op.forward(inputs).float()
    by_row = [op.bundle.postprocessing({"pred": row})["pred"].tolist() for row in logits]
    flat = [value for row in by_row for value in row]
    assert [p[name] for p in batched for name in ("cardiomegaly", "effusion")] == pytest.approx(flat, abs=1e-6)
    assert all(sum(p.values()) == pytest.approx(1.0) for p in batched)


def test_an_enhanced_multiframe_ct_is_the_same_volume_as_the_series_it_was_converted_from() -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    slices = _ct_slices(3)
    for ds in slices:  # the converter requires what a real CT series carries
        ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or "1.2.826.0.1.3680043.8.498.1"
    enhanced = LegacyConvertedEnhancedCTImage(slices, series_instance_uid=generate_uid(), series_number=9,
                                              sop_instance_uid=generate_uid(), instance_number=1)
    enhanced = dcmread(_written(enhanced))  # as the store would hand it over: read back from a file
    from_series, from_frames = assemble_volume(slices), assemble_volume([enhanced])
    assert from_frames.voxels.shape == (3, 128, 128)
    np.testing.assert_array_equal(from_frames.voxels, from_series.voxels)  # frames sorted along the normal, in HU
    assert from_frames.spacing == pytest.approx(from_series.spacing)
    assert from_frames.sop_instance_uids == [str(enhanced.SOPInstanceUID)] * 3


def test_an_enhanced_ct_takes_rescale_and_spacing_from_its_functional_groups() -> None:
    ds = dcmread(get_testdata_file("eCT_Supplemental.dcm"))  # Enhanced CT: no top-level rescale or spacing
    volume = assemble_volume([ds])
    assert volume.spacing == pytest.approx((10.0, 0.388672, 0.388672))  # frames 10 mm apart along the normal
    stored = ds.pixel_array.astype(np.float32)
    # the shared Pixel Value Transformation (intercept -1024) makes stored values Hounsfield units
    assert (volume.voxels.min(), volume.voxels.max()) == (stored.min() - 1024, stored.max() - 1024)


def _written(ds: Dataset) -> Any:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer
