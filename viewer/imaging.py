"""Pure image work for the review page (no Streamlit): window/level presets, the heatmap overlay at an
opacity, its colour bar, zoom. The API renders the frames (DICOMweb ``/rendered``); this only composes.

The heatmap artifact MedBridge stores is the model's Grad-CAM (jet colour map) already blended over the
image it scored, so "opacity" fades between the frame as rendered here (with the reviewer's window) and
the model's overlay: 0 shows the image alone, 1 the model's overlay alone.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# (center, width) in the modality's units (Hounsfield for CT); None: the image's own VOI (its window
# attributes or LUT), which the API applies when no window is asked for
PRESETS: dict[str, dict[str, tuple[float, float] | None]] = {
    "CT": {"Image VOI": None, "Lung": (-600.0, 1500.0), "Mediastinum": (40.0, 400.0), "Bone": (400.0, 1800.0),
           "Brain": (40.0, 80.0)},
}
DEFAULT_PRESETS: dict[str, tuple[float, float] | None] = {"Image VOI": None}

# the colour map the imaging model draws its heatmap with (inference.imaging.operator._JET)
_JET = np.array([[0.0, 0.0, 0.0, 0.5], [0.125, 0.0, 0.0, 1.0], [0.375, 0.0, 1.0, 1.0],
                 [0.625, 1.0, 1.0, 0.0], [0.875, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])


def presets_for(modality: str | None) -> dict[str, tuple[float, float] | None]:
    return PRESETS.get((modality or "").upper(), DEFAULT_PRESETS)


def window_param(center: float, width: float) -> str:
    """The rendered route's ``window`` parameter (PS3.18 8.3.5.1.3)."""
    return f"{center:g},{max(width, 1.0):g},linear"


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def blend(frame_png: bytes, overlay_png: bytes, opacity: float) -> bytes:
    """The frame with the model's overlay at ``opacity`` (0..1), at the frame's size."""
    frame = _rgb(frame_png)
    overlay = _rgb(overlay_png).resize(frame.size, Image.Resampling.BILINEAR)
    return _png(Image.blend(frame, overlay, max(0.0, min(1.0, opacity))))


def zoom(png: bytes, factor: float) -> bytes:
    """The centre 1/``factor`` of the picture, scaled back to its size (factor 1: unchanged)."""
    if factor <= 1.0:
        return png
    image = _rgb(png)
    w, h = image.size
    cw, ch = max(1, round(w / factor)), max(1, round(h / factor))
    left, top = (w - cw) // 2, (h - ch) // 2
    return _png(image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.LANCZOS))


def colour_bar(width: int = 256, height: int = 18) -> bytes:
    """The heatmap's colour map from low (left) to high (right) attention."""
    values = np.linspace(0.0, 1.0, width)
    rgb = np.stack([np.interp(values, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)], axis=-1)
    row = (rgb * 255 + 0.5).astype(np.uint8)
    return _png(Image.fromarray(np.repeat(row[None, :, :], height, axis=0), mode="RGB"))
