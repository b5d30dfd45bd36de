"""Imaging fixtures: one quick demo bundle trained for the whole test session (real DICOM data)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from inference.imaging.bundle import load_bundle  # noqa: E402
from inference.imaging.operator import BundleOperator  # noqa: E402
from inference.imaging.registry import ModelRegistry, RoutingRule  # noqa: E402
from inference.imaging.train import train_demo_model  # noqa: E402


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Train the quick schedule once; yields (bundle folder, its metadata)."""
    weights = tmp_path_factory.mktemp("imaging-model") / "demo-bundle"
    lines: list[str] = []
    # One thread: deterministic numerics whatever the machine load.
    meta = train_demo_model(weights, quick=True, seed=0, log=lines.append, threads=1)
    assert lines, "training should report progress"
    yield weights, meta


@pytest.fixture(scope="session")
def detector(trained_model: tuple[Path, dict[str, Any]]) -> BundleOperator:
    return BundleOperator(load_bundle(trained_model[0], "cpu"))


@pytest.fixture(scope="session")
def registry(detector: BundleOperator) -> ModelRegistry:
    """The default registry: the demo bundle for every series."""
    return ModelRegistry([(detector, RoutingRule())])
