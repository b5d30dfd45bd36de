"""Pixel access for DICOMweb without torch: frames as stored or decoded, and rendered images.

* :func:`frames` returns the requested frames of an instance, each as (bytes, media type):
  the compressed bitstream with its media type for encapsulated transfer syntaxes, the native
  bytes (``application/octet-stream``) otherwise, or decoded native bytes when ``decode`` is set.
* :func:`render` returns one frame as an 8-bit PNG, JPEG or GIF, windowed like a viewer would
  (Modality LUT, then the first VOI window/LUT, else the 1st-99th percentile range;
  MONOCHROME1 inverted; colour kept), with the PS3.18 8.3.5.1 rendering parameters a request may
  carry (:class:`Rendering`, parsed by :func:`rendering_from_query`): ``window``, ``viewport``, ``quality``.

Errors: :class:`PixelError` (a ``ValueError``) with a message that names the problem; no patient
data in any message. Decoding compressed pixels needs pylibjpeg and its plugins.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
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


class FrameTooLargeError(PixelError):
    """A frame whose header promises more pixels than MedBridge decodes (checked before decoding)."""


# Decoding a frame holds it as an array, and rendering it a float copy or two: a header saying
# 60,000 x 60,000 would ask for gigabytes. 2**26 samples (8192 x 8192 grey, a mammogram is ~21 M)
# bounds one rendered frame to ~0.5 GiB at the worst step; larger frames are served as stored.
MAX_DECODED_SAMPLES = 1 << 26


def check_decodable(ds: Dataset) -> None:
    """Refuse (:class:`FrameTooLargeError`) a frame of more than :data:`MAX_DECODED_SAMPLES`, from
    Rows x Columns x Samples per Pixel alone, before any pixel is decoded."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise PixelError("the image has no usable Rows, Columns or Samples per Pixel") from None
    if rows < 1 or columns < 1 or samples < 1:
        raise PixelError("the image has no usable Rows, Columns or Samples per Pixel")
    if rows * columns * samples > MAX_DECODED_SAMPLES:
        raise FrameTooLargeError(
            f"a frame of {rows} x {columns} x {samples} samples is larger than this server decodes "
            f"({MAX_DECODED_SAMPLES} samples); retrieve the instance or its frames as stored instead")


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
        check_decodable(ds)
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
    data = arr.astype(np.float32, copy=False)  # 8-bit output needs no more precision: half float64's memory
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [1.0, 99.0]) if robust else (finite.min(), finite.max())
    if hi <= lo:
        lo, hi = finite.min(), finite.max()
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    lo, hi = np.float32(lo), np.float32(hi)  # a float64 scalar would make every step below float64
    return (np.clip((data - lo) / (hi - lo), 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


RENDERED_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")  # PS3.3 C.11.2.1.2 / C.11.2.1.3


class RenderingParameterError(ValueError):
    """A rendering query parameter that does not follow PS3.18 8.3.5.1 (the client's to fix: 400)."""


@dataclass(frozen=True)
class Rendering:
    """What a Retrieve Rendered request asks for beyond the media type (PS3.18 8.3.5.1)."""

    window: tuple[float, float, str] | None = None  # center, width, function
    viewport: tuple[int, int] | None = None  # vw, vh: the largest picture, aspect kept
    region: tuple[int, int, int, int] | None = None  # sx, sy, sw, sh of the source (negative size: flipped)
    quality: int = 90  # lossy media types (image/jpeg)


def _numbers(name: str, text: str, count: tuple[int, ...], kind: type) -> list[Any]:
    parts = text.split(",")
    if len(parts) not in count:
        expected = " or ".join(map(str, count))
        raise RenderingParameterError(f"{name}={text!r}: expected {expected} comma-separated values")
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        raise RenderingParameterError(f"{name}={text!r}: not a list of {'integers' if kind is int else 'numbers'}") \
            from None
    if kind is float and not all(math.isfinite(v) for v in values):
        raise RenderingParameterError(f"{name}={text!r}: values must be finite")
    return values


def rendering_from_query(query: Mapping[str, str]) -> Rendering:
    """``window=center,width,function``, ``viewport=vw,vh[,sx,sy,sw,sh]``, ``quality=1..100``.

    ``annotation`` and ``iccprofile`` are not supported: a request for them is refused, not ignored."""
    window = viewport = region = None
    quality = Rendering.quality
    if "window" in query:
        parts = query["window"].split(",")
        if len(parts) != 3 or parts[2] not in WINDOW_FUNCTIONS:
            raise RenderingParameterError(f"window={query['window']!r}: expected center,width,function with "
                                          f"function one of {', '.join(WINDOW_FUNCTIONS)}")
        c, w = _numbers("window", ",".join(parts[:2]), (2,), float)
        if w <= 0 or (w < 1 and parts[2] == "linear"):
            raise RenderingParameterError(f"window={query['window']!r}: the width must be > 0 (>= 1 for linear)")
        window = (c, w, parts[2])
    if "viewport" in query:
        values = _numbers("viewport", query["viewport"], (2, 6), int)
        if values[0] < 1 or values[1] < 1 or values[0] * values[1] > 2**24:
            raise RenderingParameterError(f"viewport={query['viewport']!r}: vw and vh must be positive "
                                          "(at most 16 Mpx together)")
        viewport = (values[0], values[1])
        if len(values) == 6:
            sx, sy, sw, sh = values[2:]
            if sx < 0 or sy < 0 or sw == 0 or sh == 0:
                raise RenderingParameterError(f"viewport={query['viewport']!r}: sx and sy must be >= 0, "
                                              "sw and sh non-zero")
            region = (sx, sy, sw, sh)
    if "quality" in query:
        (quality,) = _numbers("quality", query["quality"], (1,), int)
        if not 1 <= quality <= 100:
            raise RenderingParameterError(f"quality={query['quality']!r}: expected an integer from 1 to 100")
    for unsupported in ("annotation", "iccprofile"):
        if unsupported in query:
            raise RenderingParameterError(f"{unsupported} is not supported by this origin server; leave it out")
    return Rendering(window=window, viewport=viewport, region=region, quality=quality)


def _apply_requested_window(data: np.ndarray[Any, Any], window: tuple[float, float, str]) -> np.ndarray[Any, Any]:
    """Grey values in 0..255 through the requested VOI function (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1)."""
    center, width, function = window
    x = data.astype(np.float64, copy=False)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # huge values end at 0 or 255
        if function == "linear" and width == 1:
            out = np.where(x > center - 0.5, 255.0, 0.0)  # a width of 1 is a threshold (C.11.2.1.2.1)
        elif function == "linear":
            out = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        elif function == "linear-exact":
            out = ((x - center) / width + 0.5) * 255.0
        else:  # sigmoid
            out = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return (np.clip(out, 0.0, 255.0) + 0.5).astype(np.uint8)


def _fit(image: Image.Image, rendering: Rendering) -> Image.Image:
    """The source region (flipped where its width or height is negative), scaled to fit the viewport."""
    if rendering.region is not None:
        # sx, sy: the region's top-left corner; sw, sh: its size, negative to flip it (PS3.18 8.3.5.1.3)
        sx, sy, sw, sh = rendering.region
        box = (sx, sy, min(sx + abs(sw), image.width), min(sy + abs(sh), image.height))
        if box[0] >= box[2] or box[1] >= box[3]:
            raise RenderingParameterError("viewport: the source region lies outside the image")
        image = image.crop(box)
        if sw < 0:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rendering.viewport is not None:
        vw, vh = rendering.viewport
        scale = min(vw / image.width, vh / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def render(
    ds: Dataset, number: int = 1, *, media_type: str = "image/jpeg", rendering: Rendering | None = None
) -> bytes:
    """Frame ``number`` (1-based) of ``ds`` as ``image/png``, ``image/jpeg`` or ``image/gif`` bytes."""
    rendering = rendering or Rendering()
    _check(ds, [number])
    check_decodable(ds)
    try:
        arr = pixel_array(ds, index=number - 1 if frame_count(ds) > 1 else None, as_rgb=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the frame cannot be rendered
        raise PixelError(f"the pixel data cannot be decoded ({type(exc).__name__})") from exc
    arr = _subsample_for(arr, rendering)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        # colour: the window applies to grey values only (PS3.18 8.3.5.1.4 speaks of grayscale)
        image = Image.fromarray(_to_uint8(arr, robust=False) if arr.dtype != np.uint8 else arr, mode="RGB")
    else:
        if rendering.window is not None:
            pixels = _apply_requested_window(apply_modality_lut(arr, ds), rendering.window)
        else:
            data, windowed = apply_window(arr, ds)
            pixels = _to_uint8(data, robust=not windowed)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            pixels = 255 - pixels
        image = Image.fromarray(pixels, mode="L")
    image = _fit(image, rendering)
    out = io.BytesIO()
    image.save(out, format=RENDERED_FORMATS.get(media_type, "JPEG"), quality=rendering.quality)
    return out.getvalue()


def _subsample_for(arr: np.ndarray[Any, Any], rendering: Rendering) -> np.ndarray[Any, Any]:
    """A view of every k-th pixel when the viewport is k (or more) times smaller than the whole
    image: windowing then copies the subsampled pixels, not the full frame (the resize to the
    viewport smooths what the stride skipped). A source region needs full-resolution coordinates."""
    if rendering.viewport is None or rendering.region is not None:
        return arr
    vw, vh = rendering.viewport
    step = int(min(arr.shape[0] / vh, arr.shape[1] / vw) // 2)  # keep twice the viewport's pixels
    return arr[::step, ::step] if step > 1 else arr


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
