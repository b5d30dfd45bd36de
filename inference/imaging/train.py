"""Train the demo lesion detector on real DICOM images with synthetic lesions painted in.

No trained medical weights are available offline, so MedBridge trains its own demonstration
model. Backgrounds are real images from pydicom's test files and the ``pydicom-data``
package (chest and extremity radiographs, CT, MR, NM, ultrasound). Each sample is a random
crop, flip and rotation of one of them, letterboxed to the model input size, with an
intensity jitter; half the samples get a **synthetic round lesion** (a soft-edged bright or
dark disc, :func:`insert_synthetic_lesion`). The label is lesion present / absent.

Validation uses separate source images (:data:`VALIDATION_SOURCES`) that training never sees,
and reports accuracy at 0.5 and ROC AUC in the returned meta.

Contract: :func:`train_demo_model` writes the model as a MONAI bundle folder at ``output`` (atomically) and
returns its ``configs/metadata.json`` content (see :mod:`inference.imaging.model`). It is deterministic for a
given ``seed`` and thread count, logs progress through ``log`` without any patient data, and raises
:class:`TrainingDataError` when too few source images can be read.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file

from inference.imaging.model import (
    ARCHITECTURE,
    FINDINGS,
    INPUT_SIZE,
    INTENDED_USE,
    MODEL_NAME,
    build_network,
    write_demo_bundle,
)
from inference.imaging.pixels import (
    NotAnImageError,
    PixelDecodeError,
    dataset_to_image,
    letterbox_box,
    resize_for_model,
    resize_image,
)

__all__ = [
    "TRAIN_SOURCES",
    "TrainingDataError",
    "VALIDATION_SOURCES",
    "insert_synthetic_lesion",
    "load_source_images",
    "make_sample",
    "train_demo_model",
]

# One file per distinct image (the *_J2K / *_UNCI copies hold the same pixels).
TRAIN_SOURCES: tuple[str, ...] = (
    "RG1_UNCR.dcm",  # CR chest PA (pydicom-data)
    "CT_small.dcm",  # CT
    "bad_sequence.dcm",  # CT neck, JPEG lossless (pydicom-data)
    "MR2_UNCR.dcm",  # MR shoulder (pydicom-data)
    "MR_small.dcm",  # MR
    "emri_small.dcm",  # MR multi-frame
    "JPEG2000.dcm",  # NM whole body
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # US echo (pydicom-data)
    "US1_UNCR.dcm",  # US colour (pydicom-data)
    "OBXXXX1A.dcm",  # US palette colour (pydicom-data)
    "examples_ybr_color.dcm",  # US multi-frame colour
    "JPEG-LL.dcm",  # NM (pydicom-data)
    # Abdominal MR: its aorta and vessels are natural bright discs, negatives the model must see.
    "examples_overlay.dcm",
)
VALIDATION_SOURCES: tuple[str, ...] = (
    "693_UNCR.dcm",  # CT head (pydicom-data)
    "RG3_UNCR.dcm",  # CR extremity (pydicom-data)
    "gdcm-US-ALOKA-16.dcm",  # US (pydicom-data)
)
_SOURCE_MAX_SIDE = 384  # sources are downsampled once; crops are taken from these
_MIN_SOURCES = 2


class TrainingDataError(RuntimeError):
    """Not enough readable source images to train or validate."""


@dataclass(frozen=True)
class _Schedule:
    steps: int
    batch_size: int
    learning_rate: float
    validation_samples: int


_FULL = _Schedule(steps=1100, batch_size=32, learning_rate=3e-3, validation_samples=600)
_QUICK = _Schedule(steps=450, batch_size=32, learning_rate=3e-3, validation_samples=300)


def insert_synthetic_lesion(
    img: np.ndarray,
    center: tuple[int, int],
    radius: float,
    contrast: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return a copy of ``img`` with a soft-edged round lesion added at ``center``.

    Args:
        img: 2D float image in [0, 1].
        center: ``(row, column)`` of the lesion centre in pixels.
        radius: radius of the disc's flat top in pixels.
        contrast: signed intensity added at the centre (positive = bright lesion).
        rng: source of the edge softness and the mild internal texture.

    The disc is 1 inside ``radius`` and falls off as a gaussian outside it (sigma between
    0.15 and 0.35 of the radius), so it blends into the background. The result is clipped
    to [0, 1] and is float32.
    """
    if img.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {img.shape}")
    if radius <= 0:
        raise ValueError("radius must be positive")
    rows, cols = np.ogrid[: img.shape[0], : img.shape[1]]
    distance = np.sqrt((rows - center[0]) ** 2 + (cols - center[1]) ** 2)
    sigma = max(0.5, radius * rng.uniform(0.15, 0.35))
    profile = np.exp(-(np.maximum(distance - radius, 0.0) ** 2) / (2.0 * sigma**2))
    texture = 1.0 + rng.normal(0.0, 0.08, size=img.shape) * (profile > 0.05)
    out = img.astype(np.float32) + np.float32(contrast) * (profile * texture).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def load_source_images(names: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """Decode the named test files that are installed; skip those that are not.

    Each image is downsampled so its longer side is at most 384 pixels.
    """
    images: list[tuple[str, np.ndarray]] = []
    for name in names:
        path = get_testdata_file(name, download=False)
        if not isinstance(path, str):
            continue
        try:
            image = dataset_to_image(pydicom.dcmread(path))
        except (NotAnImageError, PixelDecodeError, pydicom.errors.InvalidDicomError):
            continue
        scale = min(1.0, _SOURCE_MAX_SIDE / max(image.shape))
        if scale < 1.0:
            image = resize_image(image, round(image.shape[0] * scale), round(image.shape[1] * scale))
        images.append((name, image))
    return images


def _random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape
    for _ in range(6):
        side = rng.uniform(0.5, 1.0) * min(height, width)
        crop_h = crop_w = side
        if rng.random() < 0.25:  # some non-square crops, so the model sees letterbox padding
            if rng.random() < 0.5:
                crop_h = side * rng.uniform(0.5, 1.0)
            else:
                crop_w = side * rng.uniform(0.5, 1.0)
        crop_h, crop_w = max(8, int(crop_h)), max(8, int(crop_w))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        crop = image[top : top + crop_h, left : left + crop_w]
        if crop.std() > 0.03:  # avoid crops of pure background
            break
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    return np.rot90(crop, int(rng.integers(0, 4)))


def make_sample(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    lesion: bool,
    size: int = INPUT_SIZE,
    difficulty: float = 1.0,
) -> np.ndarray:
    """One augmented ``size x size`` training sample from a source image, with or without a lesion.

    ``difficulty`` in [0, 1] is the curriculum: at 0 the background's contrast is damped and
    lesions are large and strong; at 1 (validation and the end of training) neither is.
    """
    crop = _random_crop(image, rng)
    sample = resize_for_model(np.ascontiguousarray(crop), size)
    easy = 1.0 - float(np.clip(difficulty, 0.0, 1.0))
    if easy > 0:
        damp = 1.0 - 0.7 * easy
        sample = (sample - sample.mean()) * damp + sample.mean()
    if lesion:
        top, left, box_h, box_w = letterbox_box(crop.shape[0], crop.shape[1], size)
        scale = size / 128.0
        radius = rng.uniform(9.0, 13.0) * scale
        margin = int(math.ceil(radius)) + 1
        # Lesions sit in tissue: retry a few times to avoid empty air / padding.
        for _ in range(8):
            row = int(rng.integers(top + margin, max(top + margin + 1, top + box_h - margin)))
            col = int(rng.integers(left + margin, max(left + margin + 1, left + box_w - margin)))
            if sample[max(0, row - margin) : row + margin + 1, max(0, col - margin) : col + margin + 1].mean() > 0.1:
                break
        magnitude = rng.uniform(0.35 + 0.15 * easy, 0.6)
        r0, r1 = max(0, row - margin), row + margin + 1
        c0, c1 = max(0, col - margin), col + margin + 1
        local = float(sample[r0:r1, c0:c1].mean())
        sign = 1.0 if rng.random() < 0.5 else -1.0
        # Keep the lesion visible: a dark disc on black air or a bright one on burnt-out white is not.
        if local + sign * magnitude > 0.95:
            sign = -1.0
        elif local + sign * magnitude < 0.05:
            sign = 1.0
        sample = insert_synthetic_lesion(sample, (row, col), radius, sign * magnitude, rng)
    gamma = math.exp(rng.uniform(-0.3, 0.3))
    sample = np.power(sample, gamma) * rng.uniform(0.85, 1.15) + rng.uniform(-0.08, 0.08)
    sample = sample + rng.normal(0.0, rng.uniform(0.0, 0.03), size=sample.shape)
    return np.clip(sample, 0.0, 1.0).astype(np.float32)


def _batch(
    sources: Sequence[np.ndarray], count: int, rng: np.random.Generator, difficulty: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = np.zeros(count, dtype=np.float32)
    labels[: count // 2] = 1.0
    rng.shuffle(labels)
    images = np.stack(
        [
            make_sample(
                sources[int(rng.integers(0, len(sources)))], rng, lesion=bool(label), difficulty=difficulty
            )
            for label in labels
        ]
    )
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)[:, None]


def _training_threads() -> int:
    cores = len(os.sched_getaffinity(0))
    busy = round(os.getloadavg()[0])
    return max(1, min(8, cores - busy))


def _roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    positives = labels > 0.5
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@torch.no_grad()
def _evaluate(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    network.eval()
    scores = torch.cat([torch.sigmoid(network(chunk)) for chunk in images.split(128)]).numpy().ravel()
    truth = labels.numpy().ravel()
    accuracy = float(((scores >= 0.5) == (truth > 0.5)).mean())
    return accuracy, _roc_auc(truth, scores)


def train_demo_model(
    output: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train the synthetic-lesion detector, write it as a MONAI bundle folder at ``output``, return its metadata.

    ``quick`` trains a shorter schedule for tests (450 instead of 1100 steps).
    ``threads`` is torch's intra-op thread count while training (restored afterwards); by
    default the cores that are idle now, because oversubscribed OpenMP threads slow small
    convolutions down many times over.
    Raises :class:`TrainingDataError` when fewer than two training or validation images load.
    """
    schedule = _QUICK if quick else _FULL
    started = time.monotonic()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(_training_threads() if threads is None else max(1, threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    validation_rng = np.random.default_rng(seed + 1_000_003)

    train_images = load_source_images(TRAIN_SOURCES)
    validation_images = load_source_images(VALIDATION_SOURCES)
    if len(train_images) < _MIN_SOURCES or len(validation_images) < _MIN_SOURCES:
        raise TrainingDataError(
            f"only {len(train_images)} training and {len(validation_images)} validation images could be "
            "read; install pydicom-data and the pylibjpeg plugins"
        )
    log(
        f"training on {len(train_images)} source images, validating on {len(validation_images)} "
        f"held-out images ({'quick' if quick else 'full'} schedule: {schedule.steps} steps of "
        f"{schedule.batch_size})"
    )
    val_x, val_y = _batch([image for _, image in validation_images], schedule.validation_samples, validation_rng)

    network = build_network()
    optimiser = torch.optim.AdamW(network.parameters(), lr=schedule.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=schedule.learning_rate, total_steps=schedule.steps, pct_start=0.15
    )
    sources = [image for _, image in train_images]
    log_every = max(1, schedule.steps // 10)
    running = 0.0
    try:
        for step in range(1, schedule.steps + 1):
            network.train()
            # Curriculum: easy samples first, full difficulty for the last 40 % of the steps.
            difficulty = min(1.0, step / (0.6 * schedule.steps))
            x, y = _batch(sources, schedule.batch_size, rng, difficulty)
            loss = F.binary_cross_entropy_with_logits(network(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            running += loss.item()
            if step % log_every == 0 or step == schedule.steps:
                count = log_every if step % log_every == 0 else step % log_every
                log(
                    f"step {step}/{schedule.steps} loss {running / count:.3f} "
                    f"({time.monotonic() - started:.0f} s)"
                )
                running = 0.0
        accuracy, auc = _evaluate(network, val_x, val_y)
        torch_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.monotonic() - started
    log(f"validation accuracy {accuracy:.3f}, ROC AUC {auc:.3f} on {len(val_y)} held-out samples")

    meta: dict[str, Any] = {
        "name": MODEL_NAME,
        "input_size": INPUT_SIZE,
        "findings": list(FINDINGS),
        "architecture": dict(ARCHITECTURE),
        "metrics": {
            "validation_accuracy": round(accuracy, 4),
            "validation_auc": round(auc, 4),
            "validation_samples": int(len(val_y)),
            "training_samples": schedule.steps * schedule.batch_size,
            "training_seconds": round(elapsed, 1),
        },
        "trained_on": [name for name, _ in train_images],
        "validated_on": [name for name, _ in validation_images],
        "training": {
            "quick": quick,
            "seed": seed,
            "steps": schedule.steps,
            "batch_size": schedule.batch_size,
            "threads": torch_threads,
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": INTENDED_USE,
    }
    meta = write_demo_bundle(Path(output), network, meta)
    log(f"wrote {meta['name']} {meta['version']} to {output}")
    return meta
