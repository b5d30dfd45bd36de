"""Pixel access for DICOMweb without torch: frames as stored or decoded, and rendered images.

* :func:`frames` returns the requested frames of an instance, each as (bytes, media type):
  the compressed bitstream with its media type for encapsulated transfer syntaxes, the native
  bytes (``application/octet-stream``) otherwise, or decoded native bytes when ``decode`` is set.
* :func:`render` returns one frame as an 8-bit PNG or JPEG, windowed like a viewer would
  (Modality LUT, then the first VOI window/LUT, else the 1st-99th percentile range;
  MONOCHROME1 inverted; colour kept).

Errors: :class:`PixelError` (a ``ValueError``) with a message that names the problem; no patient
data in any message. Decoding compressed pixels needs pylibjpeg and its plugins.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

# PS3.18 Table 8.7.3-2/-3: media types of compressed frames, by transfer syntax
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class PixelError(ValueError):
    """The instance has no (usable) pixel data for the request."""


def frame_count(ds: Dataset) -> int:
    if "PixelData" not in ds:
        raise PixelError("the instance has no pixel data (it is not an image)")
    return int(ds.get("NumberOfFrames", 1) or 1)


def _check(ds: Dataset, numbers: list[int]) -> int:
    count = frame_count(ds)
    for n in numbers:
        if not 1 <= n <= count:
            raise PixelError(f"frame {n} does not exist: the instance has {count} frame(s)")
    return count


def frames(ds: Dataset, numbers: list[int], *, decode: bool = False) -> list[tuple[bytes, str]]:
    """The frames ``numbers`` (1-based) of ``ds`` (a data set read with its file meta)."""
    count = _check(ds, numbers)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated and not decode:
        media_type = FRAME_MEDIA_TYPES.get(str(syntax), "application/octet-stream")
        media_type = f"{media_type}; transfer-syntax={syntax}"
        all_frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [(all_frames[n - 1], media_type) for n in numbers]
    if syntax.is_encapsulated or syntax.is_deflated or not syntax.is_little_endian:
        try:
            return [(pixel_array(ds, index=n - 1, raw=True).tobytes(), "application/octet-stream") for n in numbers]
        except Exception as exc:  # noqa: BLE001 - any decoder failure means this frame cannot be served
            raise PixelError(f"the pixel data cannot be decoded ({type(exc).__name__})") from exc
    bits = int(ds.BitsAllocated)
    if bits % 8:
        raise PixelError("frames of 1-bit pixel data are not supported")
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
    data = ds.PixelData
    return [(bytes(data[(n - 1) * size : n * size]), "application/octet-stream") for n in numbers]


def _to_uint8(arr: np.ndarray[Any, Any], *, robust: bool) -> np.ndarray[Any, Any]:
    data = arr.astype(np.float64, copy=False)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [1.0, 99.0]) if robust else (finite.min(), finite.max())
    if hi <= lo:
        lo, hi = finite.min(), finite.max()
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    return (np.clip((data - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render(ds: Dataset, number: int = 1, *, media_type: str = "image/jpeg") -> bytes:
    """Frame ``number`` (1-based) of ``ds`` as ``image/png`` or ``image/jpeg`` bytes."""
    _check(ds, [number])
    try:
        arr = pixel_array(ds, index=number - 1 if frame_count(ds) > 1 else None, as_rgb=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the frame cannot be rendered
        raise PixelError(f"the pixel data cannot be decoded ({type(exc).__name__})") from exc
    if arr.ndim == 3 and arr.shape[-1] == 3:
        image = Image.fromarray(_to_uint8(arr, robust=False) if arr.dtype != np.uint8 else arr, mode="RGB")
    else:
        data, windowed = apply_window(arr, ds)
        pixels = _to_uint8(data, robust=not windowed)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            pixels = 255 - pixels
        image = Image.fromarray(pixels, mode="L")
    out = io.BytesIO()
    image.save(out, format="PNG" if media_type == "image/png" else "JPEG", quality=90)
    return out.getvalue()


def apply_window(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, bool]:
    """Grey values through the modality LUT, then the data set's VOI window; whether a window applied.

    A malformed window is not fatal: the caller scales the unwindowed values itself. Shared with the
    CNN's input preparation (inference/imaging/pixels.py), so the viewer shows what the model saw.
    """
    data = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        try:
            return apply_voi_lut(data, ds, index=0), True
        except (ValueError, IndexError, TypeError, AttributeError):
            pass
    return data, False
