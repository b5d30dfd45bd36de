"""Turn a DICOM dataset into one grayscale image the imaging model can read.

Contract:

* :func:`dataset_to_image` takes a decoded-header :class:`pydicom.Dataset` and returns a 2D
  ``float32`` array with values in ``[0, 1]`` where bright means high signal as a reader would
  see it (``MONOCHROME1`` is inverted). It decodes compressed transfer syntaxes through
  pydicom's pixel handlers (pylibjpeg and its plugins: JPEG baseline/extended/lossless,
  JPEG-LS, JPEG 2000, RLE; deflate and big endian are handled by pydicom itself), takes the
  middle frame of a multi-frame image, converts colour (RGB, YBR, palette) to luminance and
  applies the Modality LUT and the first VOI LUT / window when the dataset has them; otherwise it scales
  between the 1st and 99th percentiles (the viewer renders a frame through the same steps, so a reviewer sees
  what the model saw).
* :func:`normalise_volume` scales a volume of modality values for a 3D bundle that leaves it to MedBridge: CT
  through a soft-tissue window in Hounsfield units (:data:`CT_DEFAULT_WINDOW`), MR and the rest by their 1st
  and 99th percentiles.
  Errors: :class:`NotAnImageError` when the dataset carries no pixel data,
  :class:`PixelDecodeError` when the pixel data cannot be decoded. Both are ``ValueError``.
* :func:`resize_for_model` letterboxes an image into a ``size x size`` square (aspect ratio
  kept, padding is 0) and :func:`letterbox_box` tells where the image lies in that square.

No file I/O and no patient data in any message.
"""

from __future__ import annotations

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.pixels import apply_color_lut
from pydicom.pixels import pixel_array as decode_pixel_array

from integration.dicom.render import apply_window

__all__ = [
    "NotAnImageError",
    "PixelDecodeError",
    "dataset_to_image",
    "letterbox_box",
    "normalise_volume",
    "resize_for_model",
    "resize_image",
]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# ITU-R BT.601 luma weights, the ones DICOM's YBR_FULL uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
# (centre, width) in HU for a CT that names no window: soft tissue, where most findings are read
CT_DEFAULT_WINDOW = (40.0, 400.0)


class NotAnImageError(ValueError):
    """The dataset has no pixel data (e.g. a structured report or an RT plan)."""


class PixelDecodeError(ValueError):
    """The dataset has pixel data that cannot be decoded into an image."""


def _transfer_syntax_name(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if uid is None:
        return "unknown transfer syntax"
    return f"{uid.name} ({uid})"


def _normalise(arr: np.ndarray, *, robust: bool) -> np.ndarray:
    """Scale to [0, 1]; robust uses the 1st/99th percentiles, otherwise min/max."""
    data = arr.astype(np.float64, copy=False)
    return _stretch(data, data, robust=robust)


def _stretch(data: np.ndarray, sample: np.ndarray, *, robust: bool = False) -> np.ndarray:
    """``data`` scaled to [0, 1] by the range of ``sample`` (its min/max, or 1st/99th percentiles)."""
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.float32)
    lo, hi = (np.percentile(finite, [1.0, 99.0]) if robust else (finite.min(), finite.max()))
    if hi <= lo:  # e.g. a mostly-constant or binary image: fall back to the full range
        lo, hi = finite.min(), finite.max()
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.float32)
    out = (np.nan_to_num(data, nan=lo) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def dataset_to_image(ds: pydicom.Dataset) -> np.ndarray:
    """Return the displayable grayscale image of ``ds`` as 2D float32 in [0, 1].

    Raises:
        NotAnImageError: ``ds`` has no (Float/Double Float) Pixel Data element.
        PixelDecodeError: the pixel data is present but cannot be decoded (unsupported or
            corrupt compression, truncated data, missing image attributes).
    """
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise NotAnImageError("the DICOM dataset has no pixel data, so it is not an image")

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        index = frames // 2 if frames > 1 else None
        # as_rgb converts YBR_* to RGB during decoding.
        arr = decode_pixel_array(ds, index=index, as_rgb=True)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError, KeyError, TypeError) as exc:
        hint = ""
        uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if uid is not None and uid.is_compressed:
            hint = " (compressed images need pylibjpeg with its libjpeg, openjpeg and rle plugins)"
        raise PixelDecodeError(
            f"cannot decode the pixel data, transfer syntax {_transfer_syntax_name(ds)}: {exc}{hint}"
        ) from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)

    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        try:
            arr = apply_color_lut(arr, ds)
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            raise PixelDecodeError(f"cannot apply the palette colour lookup table: {exc}") from exc

    if arr.ndim == 3 and arr.shape[-1] == 3:
        return _normalise(arr.astype(np.float64) @ _LUMA, robust=True)
    if arr.ndim != 2 or samples not in (1, 3):
        raise PixelDecodeError(f"unexpected decoded pixel array of shape {arr.shape}")

    windowed = _windowed_by_table(arr, ds)
    if windowed is not None:
        image = windowed
    else:
        data, has_voi = apply_window(arr, ds)
        # After a window the range is already chosen by the modality, so only stretch it; without one
        # (absent or malformed) the percentile scaling still gives an image.
        image = _normalise(data, robust=not has_voi)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32, copy=False)


def _windowed_by_table(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The windowed, stretched image of integer grey pixels through a lookup table; None where it does not apply.

    Modality LUT, VOI window and the min/max stretch are a function of the stored value alone, so they run
    on the stored values between the image's lowest and highest (a few thousand for 12-bit CT) through the
    very same :func:`apply_window` and :func:`_normalise` arithmetic, and each pixel is one lookup: bit for bit
    the per-pixel result at a tenth of its cost (pydicom windows every pixel in float64, which was most of
    the imaging pipeline's time beyond the forward). The stretch takes the extremes of the values present:
    for a rescale and a window (monotonic) those are the table's ends; a LUT in the data set may be
    anything, so then the values present are counted. Not for images without a window: their percentile
    stretch depends on how often each value occurs.
    """
    if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        return None
    if not ("VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)):
        return None
    lowest, highest = int(arr.min()), int(arr.max())
    values = np.arange(lowest, highest + 1).astype(arr.dtype)
    data, has_voi = apply_window(values, ds)
    if not has_voi:  # a malformed window: the percentile path decides
        return None
    data = np.asarray(data, dtype=np.float64)
    index = arr if lowest == 0 else np.subtract(arr, lowest, dtype=np.int32)
    if "VOILUTSequence" in ds or "ModalityLUTSequence" in ds:
        present = np.bincount(index.ravel(), minlength=len(values)) > 0
    else:
        present = np.zeros(len(values), dtype=bool)
        present[[0, -1]] = True
    table = _stretch(data, data[present])
    return np.take(table, index)


def _ct_window(hounsfield: np.ndarray) -> np.ndarray:
    centre, width = CT_DEFAULT_WINDOW
    return np.clip((hounsfield - (centre - width / 2.0)) / width, 0.0, 1.0)


def normalise_volume(voxels: np.ndarray, modality: str) -> np.ndarray:
    """Modality values to float32 [0, 1]: CT through the soft-tissue HU window, others by percentiles."""
    if modality.upper() == "CT":
        return _ct_window(voxels.astype(np.float32, copy=False)).astype(np.float32)
    return _normalise(voxels, robust=True)


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``height x width`` image lands inside the ``size x size`` letterbox.

    Returns ``(top, left, box_height, box_width)`` in model-input pixels.
    """
    if height <= 0 or width <= 0 or size <= 0:
        raise ValueError("image and target sizes must be positive")
    scale = size / max(height, width)
    box_h = max(1, min(size, round(height * scale)))
    box_w = max(1, min(size, round(width * scale)))
    return (size - box_h) // 2, (size - box_w) // 2, box_h, box_w


def resize_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2D image to ``height x width`` (antialiased bilinear), float32."""
    tensor = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    if tensor.shape[-2:] == (height, width):
        return tensor[0, 0].numpy().copy()
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def resize_for_model(img: np.ndarray, size: int) -> np.ndarray:
    """Letterbox a 2D image into a ``size x size`` float32 square, keeping its aspect ratio.

    The image is scaled (antialiased bilinear) so its longer side is ``size`` and centred;
    the padding is 0. Values are clipped to [0, 1].
    """
    if img.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {img.shape}")
    top, left, box_h, box_w = letterbox_box(img.shape[0], img.shape[1], size)
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + box_h, left : left + box_w] = resize_image(img, box_h, box_w)
    return np.clip(out, 0.0, 1.0)
