"""Pure image work for the review page (no Streamlit): window/level presets, the heatmap overlay at an
opacity, its colour bar, zoom. The API renders the frames (DICOMweb ``/rendered``); this only composes.

The imaging worker stores the heatmap twice: as a layer alone (the Grad-CAM intensity, 8-bit grey, at the
image's geometry) and as an overlay already blended over the image it scored. With the layer,
:func:`overlay_layer` colours it with the colour bar's map and lays it over the frame as rendered here (the
reviewer's window) at the chosen opacity: 0 shows the frame unchanged, 1 the coloured heat wherever there is
heat, the frame where there is none. Results from before the layer have only the overlay: :func:`blend` fades
between the frame and that picture.
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

# the colour map the imaging model draws its heatmap with (inference.imaging.operator._colour_map, in closed form)
_JET = np.array([[0.0, 0.0, 0.0, 0.5], [0.125, 0.0, 0.0, 1.0], [0.375, 0.0, 1.0, 1.0],
                 [0.625, 1.0, 1.0, 0.0], [0.875, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])


def presets_for(modality: str | None) -> dict[str, tuple[float, float] | None]:
    return PRESETS.get((modality or "").upper(), DEFAULT_PRESETS)


def window_param(center: float, width: float) -> str:
    """The rendered route's ``window`` parameter (PS3.18 8.3.5.1.3)."""
    return f"{center:g},{max(width, 1.0):g},linear"


# heat below this (of the peak) is transparent, above it the layer is fully at the chosen opacity: the
# image stays readable around the hot spot instead of under a blue wash (the jet map's low end)
HEAT_FLOOR = 0.2


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


def colour_map(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats as uint8 RGB through the heatmap's colour map (the one :func:`colour_bar` shows)."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    rgb = np.stack([np.interp(flat, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)], axis=-1)
    return (rgb.reshape(*values.shape, 3) * 255 + 0.5).astype(np.uint8)


def overlay_layer(frame_png: bytes, layer_png: bytes, opacity: float) -> bytes:
    """The frame with the heatmap layer (grey intensity PNG) coloured and laid over it at ``opacity``
    (0..1), at the frame's size. The layer is resized to the frame: both have the image's aspect ratio, so
    it lies on the frame whatever viewport the frame was rendered for."""
    frame = _rgb(frame_png)
    layer = Image.open(io.BytesIO(layer_png)).convert("L").resize(frame.size, Image.Resampling.BILINEAR)
    heat = np.asarray(layer, dtype=np.float32) / 255.0
    alpha = max(0.0, min(1.0, opacity)) * np.clip(heat / HEAT_FLOOR, 0.0, 1.0)[..., None]
    base = np.asarray(frame, dtype=np.float32)
    out = base * (1.0 - alpha) + colour_map(heat).astype(np.float32) * alpha
    return _png(Image.fromarray((out + 0.5).astype(np.uint8), mode="RGB"))


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
    row = colour_map(np.linspace(0.0, 1.0, width))
    return _png(Image.fromarray(np.repeat(row[None, :, :], height, axis=0), mode="RGB"))
