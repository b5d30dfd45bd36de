"""The imaging inference operator: one image in, finding probabilities and a Grad-CAM out.

Contract:

* :class:`LesionDetector` loads the weights once in its constructor
  (:class:`~inference.imaging.model.ModelNotFoundError` when the file is missing,
  :class:`~inference.imaging.model.ModelFileError` when it is not a model of ours).
* :meth:`LesionDetector.run` is pure: it takes a 2D image with values in [0, 1] (as made by
  :func:`~inference.imaging.pixels.dataset_to_image`), touches no files, and returns an
  :class:`ImagingResult`. It raises ``ValueError`` for anything that is not a finite 2D image.
  Calls are serialised by a lock, so it is safe to call from ``asyncio.to_thread`` or any
  worker thread.
* The model detects **synthetic round lesions only**; it is a demonstration, not for
  clinical use (see ``LesionDetector.intended_use``).
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.visualize import GradCAM
from PIL import Image

from inference.imaging.model import GRADCAM_TARGET_LAYER, load_weights, resolve_device
from inference.imaging.pixels import dataset_to_image, letterbox_box, resize_for_model, resize_image

__all__ = ["ImagingResult", "LesionDetector"]

_DISPLAY_MAX = 512
_DISPLAY_MIN = 256
# The heatmap layer is stored at the image's own geometry (Rows x Columns, what /rendered returns without a
# viewport) so that it lies on the rendered frame pixel for pixel; beyond this longest side it is scaled down,
# aspect kept: the Grad-CAM behind it is model-input coarse, and a mammogram-sized layer would only cost bytes.
_LAYER_MAX = 2048
# Anchors of the "jet" colour map: value -> (r, g, b).
_JET = np.array(
    [
        [0.0, 0.0, 0.0, 0.5],
        [0.125, 0.0, 0.0, 1.0],
        [0.375, 0.0, 1.0, 1.0],
        [0.625, 1.0, 1.0, 0.0],
        [0.875, 1.0, 0.0, 0.0],
        [1.0, 0.5, 0.0, 0.0],
    ]
)


@dataclass(frozen=True)
class ImagingResult:
    """What the detector saw.

    Attributes:
        probabilities: finding name -> probability in [0, 1].
        heatmap_png: the Grad-CAM heatmap, colour-mapped, as PNG bytes at display size
            (the image's aspect ratio, longer side between 256 and 512 pixels).
        overlay_png: the grayscale image with the heatmap blended on top, PNG, same size.
        heatmap_layer_png: the Grad-CAM intensity alone, single-channel 8-bit PNG (0 = no attention,
            255 = the peak), the letterbox undone: at the image's geometry (its longer side scaled down to
            2048 when larger, aspect kept), so it lies on a rendered frame of the image pixel for pixel
            once resized to the frame's size. A viewer colour-maps and blends it over any window/level.
        heatmap: the Grad-CAM as 2D float32 in [0, 1] at model input size (letterboxed like
            the model input; the padding is 0).
    """

    probabilities: dict[str, float]
    heatmap_png: bytes = field(repr=False)
    overlay_png: bytes = field(repr=False)
    heatmap: np.ndarray = field(repr=False)
    heatmap_layer_png: bytes = field(repr=False)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _colour_map(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] floats to uint8 RGB with the jet colour map."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    channels = [np.interp(flat, _JET[:, 0], _JET[:, channel]) for channel in (1, 2, 3)]
    rgb = np.stack(channels, axis=-1).reshape(*values.shape, 3)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _grey_png(values: np.ndarray) -> bytes:
    """[0, 1] floats as a single-channel 8-bit PNG."""
    grey = (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _layer_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, _LAYER_MAX / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _display_size(height: int, width: int) -> tuple[int, int]:
    longest = max(height, width)
    target = min(max(longest, _DISPLAY_MIN), _DISPLAY_MAX)
    scale = target / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


class LesionDetector:
    """Detects synthetic round lesions in a 2D image and explains where with Grad-CAM."""

    def __init__(self, weights_path: Path, device: str = "auto") -> None:
        self._device = resolve_device(device)
        self._model, meta = load_weights(Path(weights_path), str(self._device))
        self.meta: dict[str, Any] = meta
        self.model_name: str = str(meta["name"])
        self.model_version: str = str(meta["version"])
        self.findings: tuple[str, ...] = tuple(meta["findings"])
        self.input_size: int = int(meta["input_size"])
        self.intended_use: str = str(meta.get("intended_use", ""))
        self._cam = GradCAM(nn_module=self._model, target_layers=GRADCAM_TARGET_LAYER, postprocessing=_identity)
        # GradCAM keeps activations and gradients in shared hooks, so one image at a time.
        self._lock = threading.Lock()

    def run(self, image: np.ndarray) -> ImagingResult:
        """Score one 2D image in [0, 1]; see the module docstring for the contract."""
        image = np.asarray(image)
        if image.ndim != 2 or min(image.shape) < 1:
            raise ValueError(f"expected a non-empty 2D image, got shape {image.shape}")
        if not np.all(np.isfinite(image)):
            raise ValueError("the image contains NaN or infinite values")
        image = np.clip(image.astype(np.float32), 0.0, 1.0)
        size = self.input_size
        model_input = resize_for_model(image, size)
        tensor = torch.from_numpy(model_input)[None, None].to(self._device)

        with self._lock:
            with torch.no_grad():
                logits = self._model.eval()(tensor)
            with torch.enable_grad():
                cam = self._cam(tensor, class_idx=0)
        probabilities = torch.sigmoid(logits.float()).cpu().numpy().ravel()

        heat = cam.detach().float().cpu().numpy().reshape(size, size)
        top, left, box_h, box_w = letterbox_box(image.shape[0], image.shape[1], size)
        mask = np.zeros_like(heat)
        mask[top : top + box_h, left : left + box_w] = 1.0
        heat = np.maximum(heat, 0.0) * mask
        peak = float(heat.max())
        heat = (heat / peak if peak > 1e-12 else np.zeros_like(heat)).astype(np.float32)

        unboxed = heat[top : top + box_h, left : left + box_w]
        display_h, display_w = _display_size(*image.shape)
        display_heat = np.clip(resize_image(unboxed, display_h, display_w), 0.0, 1.0)
        layer = np.maximum(resize_image(unboxed, *_layer_size(*image.shape)), 0.0)
        # resampling rounds the peak off: scale back so that 255 is still the model's peak attention
        layer = layer / float(layer.max()) if layer.max() > 1e-12 else layer
        display_gray = np.clip(resize_image(image, display_h, display_w), 0.0, 1.0)
        colour = _colour_map(display_heat)
        alpha = (0.6 * display_heat)[..., None]
        gray_rgb = np.repeat(display_gray[..., None] * 255.0, 3, axis=-1)
        overlay = (gray_rgb * (1.0 - alpha) + colour.astype(np.float32) * alpha + 0.5).astype(np.uint8)

        return ImagingResult(
            probabilities={
                name: float(probabilities[index]) for index, name in enumerate(self.findings)
            },
            heatmap_png=_png(colour),
            overlay_png=_png(overlay),
            heatmap=heat,
            heatmap_layer_png=_grey_png(layer),
        )

    def run_dataset(self, ds: pydicom.Dataset) -> ImagingResult:
        """Decode ``ds`` with :func:`dataset_to_image` and :meth:`run` it.

        Raises NotAnImageError / PixelDecodeError from the decoding step.
        """
        return self.run(dataset_to_image(ds))
