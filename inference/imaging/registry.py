"""Which imaging models run on which series: the model registry.

``MEDBRIDGE_MODELS`` names a YAML or JSON file::

    models:
      - bundle: bundles/chest-cr          # a MONAI bundle folder; relative to this file
        route:                            # every rule given must hold; none given: every series
          modalities: [CR, DX]
          body_parts: [CHEST]             # Body Part Examined, case-insensitive
          sop_classes: [1.2.840.10008.5.1.4.1.1.1]
          series_description: "(?i)pa|ap"  # a regular expression searched in Series Description
          min_slices: 1                   # instances (or frames of one multi-frame instance) in the series
      - bundle: bundles/ct-organs
        route: {modalities: [CT], min_slices: 20}

Unset, the registry holds the demo bundle alone, routed to every series. Several models may match one series;
each runs. :func:`load_registry` loads every bundle at start-up, so a bad one stops the service with a
:class:`~inference.imaging.bundle.BundleError` naming it; a malformed file raises :class:`ModelsFileError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inference.imaging.bundle import BundleError, load_bundle
from inference.imaging.operator import BundleOperator

__all__ = ["ModelEntry", "ModelRegistry", "ModelsFileError", "RoutingRule", "SeriesInfo", "load_registry",
           "read_models_file"]


class ModelsFileError(BundleError):
    """The MEDBRIDGE_MODELS file cannot be read; the message says what to fix."""


@dataclass(frozen=True)
class SeriesInfo:
    """What routing looks at in one series (from its first instance's header)."""

    modality: str
    body_part: str
    sop_class_uid: str
    series_description: str
    slices: int


@dataclass(frozen=True)
class RoutingRule:
    """Every rule given must hold (empty sets and None hold for any series)."""

    modalities: frozenset[str] = frozenset()
    body_parts: frozenset[str] = frozenset()
    sop_classes: frozenset[str] = frozenset()
    series_description: re.Pattern[str] | None = None
    min_slices: int = 1

    def matches(self, series: SeriesInfo) -> bool:
        return (
            (not self.modalities or series.modality.upper() in self.modalities)
            and (not self.body_parts or series.body_part.upper() in self.body_parts)
            and (not self.sop_classes or series.sop_class_uid in self.sop_classes)
            and (self.series_description is None or bool(self.series_description.search(series.series_description)))
            and series.slices >= self.min_slices
        )


@dataclass(frozen=True)
class ModelEntry:
    bundle: Path
    route: RoutingRule


@dataclass(frozen=True)
class _Registered:
    operator: BundleOperator
    route: RoutingRule


class ModelRegistry:
    """The loaded models and their routes."""

    def __init__(self, models: Sequence[tuple[BundleOperator, RoutingRule]]) -> None:
        self._models = [_Registered(operator, route) for operator, route in models]

    @property
    def operators(self) -> list[BundleOperator]:
        return [m.operator for m in self._models]

    def route(self, series: SeriesInfo) -> list[BundleOperator]:
        """The models that run on ``series``, in the file's order."""
        return [m.operator for m in self._models if m.route.matches(series)]


def _strings(where: str, value: Any, upper: bool = True) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelsFileError(f"{where} must be a list of strings")
    return frozenset(v.upper() if upper else v for v in value)


def _rule(where: str, raw: Any) -> RoutingRule:
    if raw is None:
        return RoutingRule()
    if not isinstance(raw, dict):
        raise ModelsFileError(f"{where}.route must be a mapping")
    unknown = set(raw) - {"modalities", "body_parts", "sop_classes", "series_description", "min_slices"}
    if unknown:
        raise ModelsFileError(f"{where}.route has unknown keys {sorted(unknown)}; allowed: modalities, body_parts, "
                              "sop_classes, series_description, min_slices")
    pattern = raw.get("series_description")
    try:
        compiled = re.compile(str(pattern)) if pattern is not None else None
    except re.error as exc:
        raise ModelsFileError(f"{where}.route.series_description is not a regular expression: {exc}") from exc
    try:
        min_slices = int(raw.get("min_slices", 1))
    except (TypeError, ValueError) as exc:
        raise ModelsFileError(f"{where}.route.min_slices must be an integer") from exc
    return RoutingRule(
        modalities=_strings(f"{where}.route.modalities", raw.get("modalities")),
        body_parts=_strings(f"{where}.route.body_parts", raw.get("body_parts")),
        sop_classes=_strings(f"{where}.route.sop_classes", raw.get("sop_classes"), upper=False),
        series_description=compiled,
        min_slices=min_slices,
    )


def read_models_file(path: Path) -> list[ModelEntry]:
    """The entries of a MEDBRIDGE_MODELS file (YAML, or JSON, which YAML reads too); bundle paths resolved
    against the file's folder. Raises :class:`ModelsFileError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelsFileError(f"MEDBRIDGE_MODELS names {path}, which does not exist: create it or unset the "
                              "variable to run the demo model alone")
    try:
        text = path.read_text(encoding="utf-8")
        content = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ModelsFileError(f"MEDBRIDGE_MODELS file {path} cannot be parsed: {exc}") from exc
    models = content.get("models") if isinstance(content, dict) else None
    if not isinstance(models, list) or not models:
        raise ModelsFileError(f"MEDBRIDGE_MODELS file {path} needs a non-empty `models:` list")
    entries = []
    for index, raw in enumerate(models):
        where = f"{path.name}: models[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("bundle"), str):
            raise ModelsFileError(f"{where} needs `bundle:`, the path of a MONAI bundle folder")
        bundle = Path(raw["bundle"]).expanduser()
        folder = bundle if bundle.is_absolute() else path.parent / bundle
        entries.append(ModelEntry(folder, _rule(where, raw.get("route"))))
    return entries


def load_registry(entries: Sequence[ModelEntry], device: str = "cpu", batch_size: int = 32) -> ModelRegistry:
    """Load every entry's bundle now; the first bad one raises its :class:`BundleError`."""
    return ModelRegistry([(BundleOperator(load_bundle(e.bundle, device), batch_size), e.route) for e in entries])
