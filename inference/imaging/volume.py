"""Assemble a series of DICOM slices (or one multi-frame instance) into a 3D volume, from pydicom alone.

Contract: :func:`assemble_volume` takes the data sets of one series and returns a :class:`Volume`: the
modality values (Modality LUT applied: Hounsfield units for CT) as float32 ``[slices, rows, cols]``, sorted
along the slice normal (the cross product of Image Orientation Patient's row and column directions) by each
slice's Image Position Patient, the voxel spacing in millimetres ``(slice, row, column)`` from the headers,
and the SOP Instance UID under each slice. Instances without a position keep their Instance Number order.
Raises :class:`VolumeError` (a ``ValueError``) when the slices do not share rows x columns or there are none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixel_array

__all__ = ["Volume", "VolumeError", "assemble_volume", "slice_normal"]


class VolumeError(ValueError):
    """The data sets cannot be stacked into one volume."""


@dataclass(frozen=True)
class Volume:
    voxels: np.ndarray = field(repr=False)  # float32 [slices, rows, cols], modality values
    spacing: tuple[float, float, float]  # mm: between slices, between rows, between columns
    sop_instance_uids: list[str]
    modality: str


def slice_normal(ds: pydicom.Dataset) -> np.ndarray | None:
    """The unit normal of the slice plane, or None when the orientation is absent or degenerate."""
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 1e-6 else None


def _position(ds: pydicom.Dataset, normal: np.ndarray | None) -> float | None:
    position = ds.get("ImagePositionPatient")
    if normal is None or position is None or len(position) != 3:
        return None
    return float(np.dot(np.asarray(position, dtype=float), normal))


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)
    return float(spacing[0]), float(spacing[1])


def _frames(ds: pydicom.Dataset) -> np.ndarray:
    """All frames of one instance as modality values [frames, rows, cols]."""
    arr = apply_modality_lut(decode_pixel_array(ds), ds).astype(np.float32, copy=False)
    return arr[None] if arr.ndim == 2 else arr


def assemble_volume(datasets: Sequence[pydicom.Dataset]) -> Volume:
    """Stack ``datasets`` (one series) into a :class:`Volume`; see the module docstring."""
    if not datasets:
        raise VolumeError("no slices to assemble")
    modality = str(datasets[0].get("Modality", ""))
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        ds = datasets[0]
        voxels = _frames(ds)
        between = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        uid = str(ds.SOPInstanceUID)
        return Volume(voxels, (between, *_pixel_spacing(ds)), [uid] * voxels.shape[0], modality)
    normal = slice_normal(datasets[0])
    keyed = [(_position(ds, normal), int(ds.get("InstanceNumber", 0) or 0), i) for i, ds in enumerate(datasets)]
    if all(key[0] is not None for key in keyed):
        keyed.sort(key=lambda key: (key[0], key[2]))
    else:
        keyed.sort(key=lambda key: (key[1], key[2]))
    ordered = [datasets[i] for _, _, i in keyed]
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in ordered}
    if len(shapes) != 1:
        raise VolumeError(f"the slices differ in size ({sorted(shapes)}); a volume needs one rows x columns")
    voxels = np.stack([_frames(ds)[0] for ds in ordered])
    positions = [key[0] for key in keyed if key[0] is not None]
    if len(positions) > 1:
        between = float(np.median(np.diff(np.asarray(positions, dtype=float))))
    else:
        between = float(ordered[0].get("SpacingBetweenSlices") or ordered[0].get("SliceThickness") or 1.0)
    return Volume(voxels, (abs(between) or 1.0, *_pixel_spacing(ordered[0])),
                  [str(ds.SOPInstanceUID) for ds in ordered], modality)
