"""Load a MONAI bundle folder offline into a ready network and its transforms.

A bundle is the MONAI Model Zoo layout::

    <folder>/configs/metadata.json   # name, version, network_data_format (inputs/outputs), ...
    <folder>/configs/inference.json  # network_def, optional preprocessing / postprocessing / inferer
    <folder>/models/model.pt         # the network's state_dict (or models/model.ts, TorchScript)

Parsed with ``monai.bundle.ConfigParser``: ``network_def`` is the network, ``preprocessing`` and
``postprocessing`` (dictionary transforms on the key ``image`` / ``pred``, as in the zoo) are the bundle's own,
``inferer`` (e.g. ``SlidingWindowInferer``) is used for segmentation when given. MedBridge reads a few things
from ``metadata.json``:

* ``network_data_format.inputs.image``: ``num_channels`` and ``spatial_shape`` (2 entries: a 2D model fed
  one image at a time; 3: a 3D model fed a series assembled into a volume);
* ``network_data_format.outputs.pred``: ``format`` ("segmentation" or anything else: classification) and
  ``channel_def`` (channel index -> finding or label name);
* an optional ``medbridge`` block: ``explain`` ({"method": "gradcam", "target_layer": "..."}), ``letterbox``
  (the preprocessing centres the image in a square, so explanation maps are cut back to the image),
  ``pixels`` ("display": MedBridge's per-modality windowing to [0, 1] first, the default; "modality": raw
  modality values such as CT Hounsfield units, the bundle's own transforms window them), ``activation``
  ("sigmoid", "softmax" or "none"; default sigmoid for classification).

Errors: :class:`BundleError` (a ``ValueError``), raised at load time with the bundle's folder and what to fix,
so a bad bundle stops start-up instead of crashing a worker on the first study.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from monai.bundle import ConfigParser

__all__ = ["BundleError", "ImagingBundle", "load_bundle", "resolve_device"]

Task = Literal["classification", "segmentation"]
_SEGMENTATION = "segmentation"


class BundleError(ValueError):
    """A bundle folder that cannot be used; the message names the folder and what to fix."""


@dataclass(frozen=True)
class ImagingBundle:
    """A loaded bundle: its network in eval mode on its device and what MedBridge needs to feed it."""

    folder: Path
    name: str
    version: str
    task: Task
    spatial_dims: int
    in_channels: int
    spatial_shape: tuple[int, ...]
    labels: dict[int, str]
    network: torch.nn.Module = field(repr=False)
    device: torch.device = field(repr=False)
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None = field(default=None, repr=False)
    postprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None = field(default=None, repr=False)
    inferer: Callable[..., Any] | None = field(default=None, repr=False)
    explain_method: str | None = None
    explain_layer: str | None = None
    letterbox: bool = False
    modality_pixels: bool = False
    activation: str = "sigmoid"
    intended_use: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def findings(self) -> tuple[str, ...]:
        return tuple(self.labels[i] for i in sorted(self.labels))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` means CUDA when available; ``"cuda"`` without a GPU is a start-up error, not a slow CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BundleError("MEDBRIDGE_DEVICE asks for cuda but torch sees no GPU: set MEDBRIDGE_DEVICE=cpu")
    return resolved


def _read_json(folder: Path, relative: str) -> dict[str, Any]:
    path = folder / relative
    if not path.is_file():
        raise BundleError(f"bundle {folder}: {relative} is missing; a MONAI bundle needs configs/metadata.json, "
                          "configs/inference.json and models/model.pt (or model.ts)")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {folder}: {relative} is not valid JSON ({exc}); fix the file") from exc
    if not isinstance(content, dict):
        raise BundleError(f"bundle {folder}: {relative} must hold a JSON object")
    return content


def _io_format(folder: Path, meta: dict[str, Any]) -> tuple[int, tuple[int, ...], Task, dict[int, str]]:
    try:
        image = meta["network_data_format"]["inputs"]["image"]
        pred = meta["network_data_format"]["outputs"]["pred"]
        channels = int(image.get("num_channels", 1))
        shape = tuple(int(v) if not isinstance(v, str) else -1 for v in image["spatial_shape"])
        labels = {int(k): str(v) for k, v in dict(pred.get("channel_def", {})).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(
            f"bundle {folder}: configs/metadata.json needs network_data_format.inputs.image (num_channels, "
            f"spatial_shape) and outputs.pred (format, channel_def): {exc!r} is missing or malformed") from exc
    if len(shape) not in (2, 3):
        raise BundleError(f"bundle {folder}: inputs.image.spatial_shape has {len(shape)} dimensions; "
                          "MedBridge feeds 2D images or 3D volumes")
    task: Task = "segmentation" if str(pred.get("format", "")).lower() == _SEGMENTATION else "classification"
    if not labels:
        labels = {i: f"class_{i}" for i in range(int(pred.get("num_channels", 1)))}
    return channels, shape, task, labels


def _network(folder: Path, parser: ConfigParser, device: torch.device) -> torch.nn.Module:
    torchscript = folder / "models" / "model.ts"
    weights = folder / "models" / "model.pt"
    if torchscript.is_file() and not weights.is_file():
        try:
            return torch.jit.load(str(torchscript), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise BundleError(f"bundle {folder}: models/model.ts is not a TorchScript module ({exc})") from exc
    if not weights.is_file():
        raise BundleError(f"bundle {folder}: models/model.pt (or model.ts) is missing; copy the weights in")
    if "network_def" not in parser.config:
        raise BundleError(f"bundle {folder}: configs/inference.json has no network_def")
    try:
        network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:  # noqa: BLE001 - ConfigParser raises whatever the target's constructor raises
        raise BundleError(f"bundle {folder}: network_def cannot be built ({type(exc).__name__}: {exc}); "
                          "check its _target_ and arguments") from exc
    if not isinstance(network, torch.nn.Module):
        raise BundleError(f"bundle {folder}: network_def does not build a torch module")
    try:
        # weights_only: tensors and plain containers, so no pickled code can run
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise BundleError(f"bundle {folder}: models/model.pt cannot be read ({exc})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # MONAI's CheckpointSaver writes {"model": state_dict, ...}
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0:3]
        raise BundleError(f"bundle {folder}: models/model.pt does not fit network_def ({' '.join(first_line)}); "
                          "ship the weights trained for this network") from exc
    return network.to(device).eval()


def _optional(folder: Path, parser: ConfigParser, key: str) -> Any:
    if key not in parser.config:
        return None
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except Exception as exc:  # noqa: BLE001 - whatever a transform's constructor raises
        raise BundleError(f"bundle {folder}: configs/inference.json's {key} cannot be built "
                          f"({type(exc).__name__}: {exc})") from exc


def load_bundle(folder: Path, device: str = "cpu") -> ImagingBundle:
    """Load the bundle at ``folder`` onto ``device``. Raises :class:`BundleError` (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} is not a folder: run `medbridge train-demo-model` for the demo "
                          "bundle or fix the path in MEDBRIDGE_MODELS / MEDBRIDGE_IMAGING_MODEL")
    meta = _read_json(folder, "configs/metadata.json")
    config = _read_json(folder, "configs/inference.json")
    channels, shape, task, labels = _io_format(folder, meta)
    parser = ConfigParser(config)
    parser.read_meta(meta)
    parser["bundle_root"] = str(folder)
    resolved = resolve_device(device)
    network = _network(folder, parser, resolved)
    options = dict(meta.get("medbridge", {}) or {})
    explain = dict(options.get("explain", {}) or {})
    activation = str(options.get("activation", "sigmoid" if task == "classification" else "softmax"))
    if activation not in ("sigmoid", "softmax", "none"):
        raise BundleError(f"bundle {folder}: medbridge.activation must be sigmoid, softmax or none")
    return ImagingBundle(
        folder=folder,
        name=str(meta.get("name") or folder.name),
        version=str(meta.get("version", "0")),
        task=task,
        spatial_dims=len(shape),
        in_channels=channels,
        spatial_shape=shape,
        labels=labels,
        network=network,
        device=resolved,
        preprocessing=_optional(folder, parser, "preprocessing"),
        postprocessing=_optional(folder, parser, "postprocessing"),
        inferer=_optional(folder, parser, "inferer"),
        explain_method=str(explain["method"]) if explain.get("method") else None,
        explain_layer=str(explain["target_layer"]) if explain.get("target_layer") else None,
        letterbox=bool(options.get("letterbox", False)),
        modality_pixels=str(options.get("pixels", "display")) == "modality",
        activation=activation,
        intended_use=str(meta.get("intended_use", "")),
        meta=meta,
    )
