"""dataset_to_image on pydicom's real test files: compressed, big endian, deflated, multi-frame, colour."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.imaging.pixels import (
    NotAnImageError,
    PixelDecodeError,
    dataset_to_image,
    letterbox_box,
    resize_for_model,
)


def _read(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not installed (pydicom / pydicom-data test files)"
    return pydicom.dcmread(path)


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",  # JPEG 2000
        "emri_small_jpeg_2k_lossless.dcm",  # JPEG 2000 lossless, multi-frame
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless process 14
        "JPGExtended.dcm",  # JPEG extended 12 bit
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL colour
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
        "MR_small_RLE.dcm",  # RLE
        "SC_rgb_rle.dcm",  # RLE, RGB
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "image_dfl.dcm",  # deflated explicit VR little endian
        "emri_small.dcm",  # multi-frame
        "RG1_UNCR.dcm",  # MONOCHROME1 chest radiograph
        "examples_palette.dcm",  # PALETTE COLOR
        "CT_small.dcm",  # rescale slope/intercept
    ],
)
def test_dataset_to_image_returns_normalised_2d_float(name: str) -> None:
    ds = _read(name)
    image = dataset_to_image(ds)
    assert image.ndim == 2
    assert image.dtype == np.float32
    assert image.shape == (ds.Rows, ds.Columns)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image.std()) > 0.05, "a real image is not constant"


def test_compressed_and_uncompressed_copies_decode_to_the_same_image() -> None:
    plain = dataset_to_image(_read("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"):
        np.testing.assert_allclose(dataset_to_image(_read(name)), plain, atol=1e-6)


def test_multiframe_uses_the_middle_frame() -> None:
    ds = _read("emri_small.dcm")
    frames = ds.pixel_array
    middle = frames[len(frames) // 2].astype(np.float64)
    image = dataset_to_image(ds).astype(np.float64)
    correlation = np.corrcoef(image.ravel(), middle.ravel())[0, 1]
    assert correlation > 0.99


def test_monochrome1_is_inverted_so_bright_means_dense() -> None:
    ds = _read("RG1_UNCR.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = ds.pixel_array.astype(np.float64)
    image = dataset_to_image(ds).astype(np.float64)
    step = 8  # subsample: the radiograph has 3.6 million pixels
    correlation = np.corrcoef(image[::step, ::step].ravel(), stored[::step, ::step].ravel())[0, 1]
    assert correlation < -0.9


def test_dataset_without_pixel_data_is_not_an_image() -> None:
    ds = _read("rtplan.dcm")
    with pytest.raises(NotAnImageError):
        dataset_to_image(ds)


def test_undecodable_pixel_data_raises_pixel_decode_error() -> None:
    ds = _read("MR_small.dcm")
    ds.PixelData = ds.PixelData[:100]  # truncated
    with pytest.raises(PixelDecodeError, match="cannot decode the pixel data"):
        dataset_to_image(ds)


def test_constructed_dataset_without_pixels_is_rejected() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    with pytest.raises(NotAnImageError):
        dataset_to_image(ds)


def test_resize_for_model_letterboxes_and_keeps_aspect() -> None:
    image = np.ones((100, 50), dtype=np.float32)
    out = resize_for_model(image, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    top, left, box_h, box_w = letterbox_box(100, 50, 64)
    assert (top, box_h) == (0, 64) and box_w == 32 and left == 16
    assert np.allclose(out[:, left : left + box_w], 1.0, atol=1e-5)
    assert np.all(out[:, :left] == 0.0) and np.all(out[:, left + box_w :] == 0.0)


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "vlut_04.dcm", "MR2_UNCR.dcm"])
def test_windowed_images_match_pydicoms_per_pixel_window_bit_for_bit(name: str) -> None:
    """dataset_to_image windows through a lookup table; the image is exactly pydicom's modality LUT, VOI
    window (or VOI LUT) and min/max stretch applied to every pixel."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read(name)
    assert "WindowCenter" in ds or "VOILUTSequence" in ds
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0).astype(np.float64)
    expected = ((windowed - windowed.min()) / (windowed.max() - windowed.min())).astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1.0 - expected
    assert np.array_equal(dataset_to_image(ds), expected)
