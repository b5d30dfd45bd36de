"""The demo imaging network and its weights file.

The network is a small 2D MONAI DenseNet with one input channel and one output logit:
the probability (after a sigmoid) that the image contains a **synthetic round lesion**,
a soft-edged bright or dark disc that :mod:`inference.imaging.train` paints into real
radiographs, CT, MR, NM and ultrasound images. It is a demonstration model, not a medical
device: it knows nothing about real pathology.

Weights file contract: one ``torch.save`` file holding ``{"state_dict": ..., "meta": {...}}``;
``meta`` is JSON-safe and carries ``name``, ``version``, ``input_size``, ``findings``,
``architecture`` (the DenseNet keyword arguments), ``metrics``, ``trained_on``, ``created_at``
and ``intended_use``. :func:`save_weights` writes it atomically (temporary file + rename).

Errors: :class:`ModelNotFoundError` (a ``FileNotFoundError``) when the file is missing,
:class:`ModelFileError` (a ``ValueError``) when it exists but is not a model of this kind.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DenseNet

__all__ = [
    "ARCHITECTURE",
    "FINDINGS",
    "GRADCAM_TARGET_LAYER",
    "INPUT_SIZE",
    "INTENDED_USE",
    "MODEL_NAME",
    "ModelFileError",
    "ModelNotFoundError",
    "build_network",
    "load_weights",
    "resolve_device",
    "save_weights",
]

FINDINGS: tuple[str, ...] = ("synthetic_round_lesion",)
MODEL_NAME = "medbridge-demo-lesion-densenet"
MODEL_BASE_VERSION = "0.1.0"
INPUT_SIZE = 64
INTENDED_USE = (
    "Demonstration only: detects synthetic round lesions (soft-edged discs painted into images "
    "by the MedBridge training script); it has never seen real pathology and is not for clinical use."
)
# Keyword arguments of monai.networks.nets.DenseNet; stored in the weights meta.
ARCHITECTURE: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": len(FINDINGS),
    "init_features": 16,
    "growth_rate": 16,
    "block_config": (3, 6),
    "bn_size": 4,
    # Not a DenseNet argument: global max instead of average pooling before the classifier,
    # so one small lesion anywhere decides the output (multiple-instance style). It learns
    # far faster than average pooling and keeps Grad-CAM focused on the lesion.
    "global_pool": "max",
}
# The last activation before global pooling: 1/8 of the input size per side.
GRADCAM_TARGET_LAYER = "class_layers.relu"


class ModelNotFoundError(FileNotFoundError):
    """The imaging weights file does not exist."""


class ModelFileError(ValueError):
    """The weights file exists but is not a MedBridge imaging model."""


def _hint(path: Path) -> str:
    return (
        f"imaging model weights not found at {path}: run `medbridge train-demo-model` "
        "or set MEDBRIDGE_IMAGING_MODEL to a weights file"
    )


def build_network(architecture: dict[str, Any] | None = None) -> torch.nn.Module:
    """Return an untrained network; ``architecture`` defaults to :data:`ARCHITECTURE`."""
    kwargs = dict(ARCHITECTURE if architecture is None else architecture)
    kwargs["block_config"] = tuple(kwargs["block_config"])
    global_pool = kwargs.pop("global_pool", "avg")
    network = DenseNet(**kwargs)
    if global_pool == "max":
        network.class_layers.pool = torch.nn.AdaptiveMaxPool2d(1)
    elif global_pool != "avg":
        raise ValueError(f"unknown global_pool {global_pool!r}")
    return network


def resolve_device(device: str) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of the parameters, so two trainings with equal weights share a version."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:10]


def save_weights(path: Path, network: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``{"state_dict", "meta"}`` to ``path`` atomically; returns the meta as written.

    ``meta["version"]`` is set to ``<base>+<weights digest>``.
    """
    state_dict = {key: value.detach().cpu() for key, value in network.state_dict().items()}
    meta = dict(meta)
    meta["version"] = f"{MODEL_BASE_VERSION}+{weights_digest(state_dict)}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict, "meta": meta}, buffer)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return meta


def load_weights(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a weights file written by :func:`save_weights`; returns ``(network in eval mode, meta)``.

    Raises:
        ModelNotFoundError: ``path`` does not exist (the message says how to make one).
        ModelFileError: the file cannot be read as a MedBridge imaging model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(_hint(path))
    try:
        # weights_only: the file is tensors and plain containers, so no pickled code can run.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise ModelFileError(f"cannot read imaging model weights at {path}: {exc}") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "meta" not in payload:
        raise ModelFileError(f"{path} is not a MedBridge imaging weights file (no state_dict/meta)")
    meta = dict(payload["meta"])
    network = build_network(meta.get("architecture"))
    try:
        network.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelFileError(f"weights at {path} do not fit the network: {exc}") from exc
    network.to(resolve_device(device)).eval()
    return network, meta
