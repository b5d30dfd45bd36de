"""The demo imaging network and the MONAI bundle it ships as.

The network is a small 2D MONAI DenseNet with one input channel and one output logit:
the probability (after a sigmoid) that the image contains a **synthetic round lesion**,
a soft-edged bright or dark disc that :mod:`inference.imaging.train` paints into real
radiographs, CT, MR, NM and ultrasound images. It is a demonstration model, not a medical
device: it knows nothing about real pathology.

:func:`write_demo_bundle` writes it as a MONAI bundle (``configs/metadata.json``,
``configs/inference.json``, ``models/model.pt``: the state_dict alone), atomically (a temporary folder renamed
into place), loadable by :func:`inference.imaging.bundle.load_bundle` and by ``monai.bundle`` itself
(``verify_metadata`` against :data:`METADATA_SCHEMA`, ``verify_net_in_out``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.networks.nets import DenseNet
from monai.transforms import MapTransform

from inference.imaging.pixels import resize_for_model

__all__ = [
    "ARCHITECTURE",
    "FINDINGS",
    "GRADCAM_TARGET_LAYER",
    "INPUT_SIZE",
    "INTENDED_USE",
    "METADATA_SCHEMA",
    "MODEL_NAME",
    "LesionDenseNet",
    "Letterboxd",
    "build_network",
    "write_demo_bundle",
]

FINDINGS: tuple[str, ...] = ("synthetic_round_lesion",)
MODEL_NAME = "medbridge-demo-lesion-densenet"
MODEL_BASE_VERSION = "0.1.0"
INPUT_SIZE = 64
INTENDED_USE = (
    "Demonstration only: detects synthetic round lesions (soft-edged discs painted into images "
    "by the MedBridge training script); it has never seen real pathology and is not for clinical use."
)
# Keyword arguments of LesionDenseNet, written into the bundle's network_def.
ARCHITECTURE: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": len(FINDINGS),
    "init_features": 16,
    "growth_rate": 16,
    "block_config": [3, 6],
    "bn_size": 4,
    # global max instead of average pooling before the classifier, so one small lesion anywhere decides the
    # output (multiple-instance style): it learns far faster than average pooling and keeps Grad-CAM on the lesion
    "global_pool": "max",
}
# The last activation before global pooling: 1/8 of the input size per side.
GRADCAM_TARGET_LAYER = "class_layers.relu"
# The MONAI bundle specification's metadata schema (required keys and network_data_format), kept here so
# verify_metadata runs offline: it reads this file instead of downloading the URL the metadata names.
METADATA_SCHEMA = Path(__file__).with_name("meta_schema.json")
_SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


class LesionDenseNet(DenseNet):
    """MONAI's DenseNet with a choice of global pooling (``"max"`` or ``"avg"``) before the classifier."""

    def __init__(self, *, global_pool: str = "avg", **kwargs: Any) -> None:
        kwargs["block_config"] = tuple(kwargs.get("block_config", (6, 12, 24, 16)))
        super().__init__(**kwargs)
        if global_pool == "max":
            self.class_layers.pool = torch.nn.AdaptiveMaxPool2d(1) if kwargs["spatial_dims"] == 2 \
                else torch.nn.AdaptiveMaxPool3d(1)
        elif global_pool != "avg":
            raise ValueError(f"unknown global_pool {global_pool!r}")


class Letterboxd(MapTransform):
    """Each channel of ``data[key]`` (a [0, 1] image) letterboxed into a ``spatial_size`` square, exactly as the
    training prepared its samples (:func:`~inference.imaging.pixels.resize_for_model`: antialiased bilinear,
    longer side to the size, centred, padding 0), so the model sees at inference what it learnt on."""

    def __init__(self, keys: str | list[str], spatial_size: int) -> None:
        super().__init__(keys)
        self.spatial_size = int(spatial_size)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            channels = np.asarray(out[key], dtype=np.float32)
            out[key] = torch.from_numpy(np.stack([resize_for_model(c, self.spatial_size) for c in channels]))
        return out


def build_network(architecture: dict[str, Any] | None = None) -> torch.nn.Module:
    """Return an untrained network; ``architecture`` defaults to :data:`ARCHITECTURE`."""
    return LesionDenseNet(**dict(ARCHITECTURE if architecture is None else architecture))


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of the parameters, so two trainings with equal weights share a version."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:10]


def _inference_config() -> dict[str, Any]:
    """network_def plus the preprocessing the training used: the [0, 1] image letterboxed into the input square."""
    return {
        "imports": ["$import torch"],
        "network_def": {"_target_": "inference.imaging.model.LesionDenseNet", **ARCHITECTURE},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "inference.imaging.model.Letterboxd", "keys": "image", "spatial_size": INPUT_SIZE},
            ],
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}],
        },
    }


def _metadata(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": _SCHEMA_URL,
        "version": meta["version"],
        "changelog": {meta["version"]: "trained by medbridge train-demo-model"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "name": meta["name"],
        "task": "Synthetic round lesion detection (demonstration)",
        "description": INTENDED_USE,
        "authors": "MedBridge",
        "copyright": "MedBridge demonstration model",
        "intended_use": INTENDED_USE,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "any", "num_channels": 1,
                "spatial_shape": [INPUT_SIZE, INPUT_SIZE], "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classification", "num_channels": len(FINDINGS),
                "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {str(i): name for i, name in enumerate(FINDINGS)}}},
        },
        "medbridge": {
            "explain": {"method": "gradcam", "target_layer": GRADCAM_TARGET_LAYER},
            "letterbox": True,
            "pixels": "display",
            "activation": "sigmoid",
            "metrics": meta.get("metrics", {}),
            "trained_on": meta.get("trained_on", []),
            "validated_on": meta.get("validated_on", []),
            "training": meta.get("training", {}),
            "created_at": meta.get("created_at"),
        },
    }


def write_demo_bundle(folder: Path, network: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the trained network as a MONAI bundle at ``folder``, replacing any there; returns its metadata.

    The version is ``<base>+<weights digest>``. Written into a temporary sibling folder and renamed into place,
    so a reader never sees half a bundle.
    """
    folder = Path(folder)
    state_dict = {key: value.detach().cpu() for key, value in network.state_dict().items()}
    metadata = _metadata({**meta, "version": f"{MODEL_BASE_VERSION}+{weights_digest(state_dict)}"})
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        (staging / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        (staging / "configs" / "inference.json").write_text(json.dumps(_inference_config(), indent=2),
                                                            encoding="utf-8")
        torch.save(state_dict, staging / "models" / "model.pt")
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return metadata
