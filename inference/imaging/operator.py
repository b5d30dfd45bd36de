"""The imaging inference operator for one MONAI bundle: images in, findings, explanation maps or a label map out.

Contract:

* :class:`BundleOperator` wraps an :class:`~inference.imaging.bundle.ImagingBundle` loaded once at start-up.
* :meth:`BundleOperator.classify` scores a batch of 2D images (values in [0, 1] as made by
  :func:`~inference.imaging.pixels.dataset_to_image`, or modality values for a bundle that asks for them) in
  one forward pass per ``batch_size`` images; on CUDA under autocast (mixed precision).
* :meth:`BundleOperator.explain` makes the Grad-CAM (``monai.visualize``) of one image and renders it: meant
  for the few images someone will look at (the worker explains the top of a study), not for every image.
* :meth:`BundleOperator.run` is both for one image (:class:`ImagingResult`).
* :meth:`BundleOperator.classify_volume` scores a :class:`~inference.imaging.volume.Volume` with a 3D
  classification bundle (one finding set per series).
* :meth:`BundleOperator.segment` turns a :class:`~inference.imaging.volume.Volume` into a
  :class:`~inference.imaging.outputs.SegmentationOutput` (3D bundles get the volume; 2D ones each slice).
* All are pure (no files, no Kafka) and raise ``ValueError`` for an input that is not a finite image. Calls
  are serialised by a lock (Grad-CAM keeps activations in hooks on the shared network), so they are safe
  from ``asyncio.to_thread`` or any worker thread.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from monai.transforms import Activationsd, Compose
from monai.visualize import GradCAM
from PIL import Image

from inference.imaging.bundle import ImagingBundle
from inference.imaging.outputs import SegmentationOutput
from inference.imaging.pixels import dataset_to_image, letterbox_box, normalise_volume, resize_image
from inference.imaging.volume import Volume

__all__ = ["BundleOperator", "Explanation", "ImagingResult"]

_DISPLAY_MAX = 512
_DISPLAY_MIN = 256
# The heatmap layer is stored at the image's own geometry (Rows x Columns, what /rendered returns without a
# viewport) so that it lies on the rendered frame pixel for pixel; beyond this longest side it is scaled down,
# aspect kept: the Grad-CAM behind it is model-input coarse, and a mammogram-sized layer would only cost bytes.
_LAYER_MAX = 2048
# The "jet" colour map, anchors value -> (r, g, b): 0 -> (0, 0, .5), .125 -> (0, 0, 1), .375 -> (0, 1, 1),
# .625 -> (1, 1, 0), .875 -> (1, 0, 0), 1 -> (.5, 0, 0). Between them each channel is linear, which is
# clip(1.5 - |4v - c|, 0, 1) with c = 3 for red, 2 for green, 1 for blue (viewer/imaging.py interpolates the anchors).
_JET_CENTRES = (3.0, 2.0, 1.0)


@dataclass(frozen=True)
class Explanation:
    """Where the model looked in one image.

    Attributes:
        heatmap: the Grad-CAM as 2D float32 in [0, 1] at model input size (letterboxed like the input).
        heatmap_png: the heatmap colour-mapped, PNG at display size (aspect kept, longer side 256-512).
        overlay_png: the grey image with the heatmap blended on top, PNG, same size.
        heatmap_layer_png: the intensity alone, 8-bit grey PNG at the image's geometry (longer side at most
            2048), so a viewer lays it on a rendered frame pixel for pixel over its own window.
    """

    heatmap: np.ndarray = field(repr=False)
    overlay_png: bytes = field(repr=False)
    heatmap_layer_png: bytes = field(repr=False)
    colour: np.ndarray = field(repr=False)  # the colour-mapped heatmap at display size, uint8 RGB

    @functools.cached_property
    def heatmap_png(self) -> bytes:
        # encoded when asked for: the worker stores the overlay and the layer only, and a PNG at display
        # size is a third of an explanation's time
        return _png(self.colour, "RGB")


@dataclass(frozen=True)
class ImagingResult:
    """One image scored and explained: ``probabilities`` (finding -> [0, 1]) and the :class:`Explanation` parts."""

    probabilities: dict[str, float]
    heatmap_png: bytes = field(repr=False)
    overlay_png: bytes = field(repr=False)
    heatmap: np.ndarray = field(repr=False)
    heatmap_layer_png: bytes = field(repr=False)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _colour_map(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] floats to uint8 RGB with the jet colour map (closed form in float32: a third of the time of
    interpolating its anchors in float64, within one grey level of it)."""
    scaled = np.clip(values, 0.0, 1.0).astype(np.float32) * 4.0
    channels = [np.clip(1.5 - np.abs(scaled - centre), 0.0, 1.0) for centre in _JET_CENTRES]
    return (np.stack(channels, axis=-1) * 255.0 + 0.5).astype(np.uint8)


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    # compress_level 1: these are regenerated on demand and fetched once; zlib's default costs 3x the time
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _batch_activation(post: object) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The bundle's postprocessing as one call on a batch of logits ``[N, C]``, when it is nothing but
    ``Activationsd`` (sigmoid or softmax) on ``pred``, as in the zoo's classifiers; None otherwise (then each
    row goes through the bundle's own Compose). MONAI's Compose per row cost half a forward's time per image."""
    transforms = getattr(post, "transforms", None)
    if not isinstance(post, Compose) or not transforms:
        return None
    steps = []
    for step in transforms:
        if (type(step) is not Activationsd or tuple(step.keys) != ("pred",) or len(step.sigmoid) != 1
                or step.other[0] is not None or step.converter.kwargs):
            return None
        steps.append((bool(step.sigmoid[0]), bool(step.softmax[0])))

    def apply(batch: torch.Tensor) -> torch.Tensor:
        for sigmoid, softmax in steps:  # Activations' own order: sigmoid, then softmax (over the channels)
            if sigmoid:
                batch = torch.sigmoid(batch)
            if softmax:
                batch = torch.softmax(batch, dim=1)
        return batch

    return apply


def _layer_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, _LAYER_MAX / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _display_size(height: int, width: int) -> tuple[int, int]:
    longest = max(height, width)
    target = min(max(longest, _DISPLAY_MIN), _DISPLAY_MAX)
    scale = target / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def _checked(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``image`` as float32 with its lowest and highest value; ValueError unless a finite 2D image."""
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"expected a non-empty 2D image, got shape {image.shape}")
    image = image.astype(np.float32, copy=False)
    # min and max propagate NaN and reach an infinity: two fast reductions instead of a boolean image
    lowest, highest = float(image.min()), float(image.max())
    if not (np.isfinite(lowest) and np.isfinite(highest)):
        raise ValueError("the image contains NaN or infinite values")
    return image, lowest, highest


class BundleOperator:
    """Runs one loaded bundle; see the module docstring for the contract."""

    def __init__(self, bundle: ImagingBundle, batch_size: int = 32) -> None:
        self.bundle = bundle
        self.model_name = bundle.name
        self.model_version = bundle.version
        self.findings = bundle.findings
        self.intended_use = bundle.intended_use
        self.batch_size = max(1, batch_size)
        self._device = bundle.device
        self._network = bundle.network
        # GradCAM hooks the network: made once, used only by explain()
        self._cam = (GradCAM(nn_module=self._network, target_layers=bundle.explain_layer,
                             postprocessing=_identity)
                     if bundle.explain_method == "gradcam" and bundle.explain_layer else None)
        self._lock = threading.Lock()
        self._batch_activation = _batch_activation(bundle.postprocessing)

    @property
    def explains(self) -> bool:
        return self._cam is not None

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def model_input(self, image: np.ndarray) -> torch.Tensor:
        """One 2D image as the network's input ``[C, H, W]``, through the bundle's preprocessing."""
        image, lowest, highest = _checked(image)
        if not self.bundle.modality_pixels and (lowest < 0.0 or highest > 1.0):
            image = np.clip(image, 0.0, 1.0)
        channels = image[None] if self.bundle.in_channels == 1 else np.repeat(image[None], self.bundle.in_channels, 0)
        if self.bundle.preprocessing is not None:
            out = self.bundle.preprocessing({"image": channels})["image"]
            return torch.as_tensor(out, dtype=torch.float32)
        shape = self.bundle.spatial_shape
        tensor = torch.from_numpy(np.ascontiguousarray(channels))
        if all(side > 0 for side in shape) and tuple(tensor.shape[1:]) != shape:
            tensor = F.interpolate(tensor[None], size=shape, mode="bilinear", align_corners=False)[0]
        return tensor

    def _activated(self, row: torch.Tensor) -> torch.Tensor:
        if self.bundle.postprocessing is not None:
            return torch.as_tensor(self.bundle.postprocessing({"pred": row})["pred"])
        if self.bundle.activation == "sigmoid":
            return torch.sigmoid(row)
        if self.bundle.activation == "softmax":
            return torch.softmax(row, dim=0)
        return row

    def _probabilities(self, logits: torch.Tensor) -> list[dict[str, float]]:
        logits = logits.float().cpu()
        rows = (list(self._batch_activation(logits)) if self._batch_activation is not None
                else [self._activated(row) for row in logits])
        results = []
        for row in rows:
            values = row.reshape(-1).tolist()
            results.append({name: float(values[i]) for i, name in sorted(self.bundle.labels.items())
                            if i < len(values)})
        return results

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's output for a batch of prepared inputs ``[N, C, ...]`` (no gradients)."""
        with self._lock, torch.no_grad(), self._autocast():
            return self._network(inputs.to(self._device, non_blocking=True))

    def classify_inputs(self, inputs: Sequence[torch.Tensor]) -> list[dict[str, float]]:
        """Probabilities for prepared inputs (:meth:`model_input`), ``batch_size`` per forward pass."""
        results: list[dict[str, float]] = []
        for start in range(0, len(inputs), self.batch_size):
            results.extend(self._probabilities(self.forward(torch.stack(list(inputs[start:start + self.batch_size])))))
        return results

    def classify(self, images: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """Probabilities for each 2D image, in order."""
        return self.classify_inputs([self.model_input(image) for image in images])

    def _cam_map(self, tensor: torch.Tensor, class_idx: int) -> np.ndarray:
        assert self._cam is not None
        with self._lock, torch.enable_grad():
            cam = self._cam(tensor[None].to(self._device), class_idx=class_idx)
        return cam.detach().float().cpu().numpy().reshape(tensor.shape[-2:])

    def explain(self, image: np.ndarray, class_idx: int = 0, prepared: torch.Tensor | None = None) -> Explanation:
        """Grad-CAM of ``image`` for output ``class_idx``, rendered (see :class:`Explanation`). ``prepared`` is
        ``image``'s :meth:`model_input` when the caller has it already (the worker keeps its top images' inputs
        from scoring), so the preprocessing does not run twice.

        Raises ``ValueError`` when the bundle asks for no explanation map or the image is not a finite 2D one.
        """
        if self._cam is None:
            raise ValueError(f"bundle {self.model_name} asks for no explanation map (metadata medbridge.explain)")
        image = _checked(image)[0]
        tensor = self.model_input(image) if prepared is None else prepared
        heat = np.maximum(self._cam_map(tensor, class_idx), 0.0)
        rows, cols = heat.shape
        if self.bundle.letterbox and rows == cols:
            top, left, box_h, box_w = letterbox_box(image.shape[0], image.shape[1], rows)
        else:
            top, left, box_h, box_w = 0, 0, rows, cols
        mask = np.zeros_like(heat)
        mask[top:top + box_h, left:left + box_w] = 1.0
        heat = heat * mask
        peak = float(heat.max())
        heat = (heat / peak if peak > 1e-12 else np.zeros_like(heat)).astype(np.float32)
        unboxed = heat[top:top + box_h, left:left + box_w]
        display_h, display_w = _display_size(*image.shape)
        display_heat = np.clip(resize_image(unboxed, display_h, display_w), 0.0, 1.0)
        layer = np.maximum(resize_image(unboxed, *_layer_size(*image.shape)), 0.0)
        # resampling rounds the peak off: scale back so that 255 is still the model's peak attention
        layer = layer / float(layer.max()) if layer.max() > 1e-12 else layer
        grey = image if not self.bundle.modality_pixels else normalise_volume(image, "")
        display_grey = np.clip(resize_image(grey, display_h, display_w), 0.0, 1.0)
        colour = _colour_map(display_heat)
        # float32 and the grey broadcast over the colour channels: the blend is a third of the float64 one's time
        alpha = (0.6 * display_heat.astype(np.float32))[..., None]
        grey = (display_grey.astype(np.float32) * 255.0)[..., None]
        overlay = (grey * (1.0 - alpha) + colour.astype(np.float32) * alpha + 0.5).astype(np.uint8)
        return Explanation(
            heatmap=heat,
            colour=colour,
            overlay_png=_png(overlay, "RGB"),
            heatmap_layer_png=_png((np.clip(layer, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "L"),
        )

    def run(self, image: np.ndarray) -> ImagingResult:
        """Score and explain one 2D image (the explanation of the most probable finding)."""
        probabilities = self.classify([image])[0]
        best = max(range(len(self.findings)), key=lambda i: probabilities.get(self.findings[i], 0.0))
        explanation = self.explain(image, class_idx=best)
        return ImagingResult(
            probabilities=probabilities,
            heatmap_png=explanation.heatmap_png,
            overlay_png=explanation.overlay_png,
            heatmap=explanation.heatmap,
            heatmap_layer_png=explanation.heatmap_layer_png,
        )

    def run_dataset(self, ds: pydicom.Dataset) -> ImagingResult:
        """Decode ``ds`` with :func:`dataset_to_image` and :meth:`run` it (NotAnImageError / PixelDecodeError)."""
        return self.run(dataset_to_image(ds))

    # -- segmentation ---------------------------------------------------------------------------------------
    def volume_input(self, volume: Volume) -> torch.Tensor:
        """A volume as the network's input ``[C, slices, rows, cols]``, through the bundle's preprocessing."""
        voxels = volume.voxels if self.bundle.modality_pixels else normalise_volume(volume.voxels, volume.modality)
        channels = np.repeat(voxels[None].astype(np.float32), self.bundle.in_channels, axis=0)
        if self.bundle.preprocessing is not None:
            return torch.as_tensor(self.bundle.preprocessing({"image": channels})["image"], dtype=torch.float32)
        return torch.from_numpy(np.ascontiguousarray(channels))

    def classify_volume(self, volume: Volume) -> dict[str, float]:
        """A 3D classifier's probabilities for ``volume`` (one series): its input through the bundle's
        preprocessing, then resized to the bundle's ``spatial_shape`` when that is fixed and the preprocessing
        left another size (as :meth:`model_input` does for 2D), one forward pass."""
        if self.bundle.task != "classification" or self.bundle.spatial_dims != 3:
            raise ValueError(f"bundle {self.model_name} is not a 3D classification bundle")
        tensor = self.volume_input(volume)
        shape = self.bundle.spatial_shape
        if all(side > 0 for side in shape) and tuple(tensor.shape[1:]) != shape:
            tensor = F.interpolate(tensor[None], size=shape, mode="trilinear", align_corners=False)[0]
        return self.classify_inputs([tensor])[0]

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Network output for one prepared input ``[C, ...]``: through the bundle's inferer when it has one."""
        batch = inputs[None].to(self._device)
        with self._lock, torch.no_grad(), self._autocast():
            if self.bundle.inferer is not None:
                return torch.as_tensor(self.bundle.inferer(batch, self._network))[0]
            shape = self.bundle.spatial_shape
            if all(side > 0 for side in shape) and tuple(batch.shape[2:]) != shape:
                mode = "trilinear" if len(shape) == 3 else "bilinear"
                resized = F.interpolate(batch, size=shape, mode=mode, align_corners=False)
                return self._network(resized)[0]
            return self._network(batch)[0]

    def _labels_from(self, logits: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        logits = logits.float()
        if tuple(logits.shape[1:]) != spatial:
            mode = "trilinear" if len(spatial) == 3 else "bilinear"
            logits = F.interpolate(logits[None], size=spatial, mode=mode, align_corners=False)[0]
        if logits.shape[0] == 1:  # one sigmoid channel: the foreground is label 1
            return (logits[0] > 0).to(torch.uint8)
        return logits.argmax(dim=0).to(torch.uint8)

    def _foreground_labels(self) -> dict[int, str]:
        names = self.bundle.labels
        if len(names) == 1:  # one sigmoid channel names the foreground
            return {1: next(iter(names.values()))}
        return {k: v for k, v in names.items() if k != 0}

    def segment(self, volume: Volume) -> SegmentationOutput:
        """The bundle's label map for ``volume`` at the volume's grid ``[slices, rows, cols]``."""
        if self.bundle.task != "segmentation":
            raise ValueError(f"bundle {self.model_name} is not a segmentation bundle")
        slices, rows, cols = volume.voxels.shape
        if self.bundle.spatial_dims == 3:
            labels = self._labels_from(self._logits(self.volume_input(volume)).cpu(), (slices, rows, cols))
        else:
            labels = torch.stack([
                self._labels_from(self._logits(self.model_input(volume.voxels[i])).cpu(), (rows, cols))
                for i in range(slices)])
        return SegmentationOutput(
            label_map=labels.cpu().numpy().astype(np.uint8),
            source_sop_instance_uids=list(volume.sop_instance_uids),
            labels=self._foreground_labels(),
            model_name=self.model_name,
            model_version=self.model_version,
        )


