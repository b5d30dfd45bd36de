"""Assemble a series of DICOM slices (or one multi-frame instance) into a 3D volume, from pydicom alone.

Contract: :func:`assemble_volume` takes the data sets of one series and returns a :class:`Volume`: the
modality values (Modality LUT applied: Hounsfield units for CT) as float32 ``[slices, rows, cols]``, sorted
along the slice normal (the cross product of Image Orientation Patient's row and column directions) by each
slice's Image Position Patient, the voxel spacing in millimetres ``(slice, row, column)`` from the headers,
and the SOP Instance UID under each slice. Instances without a position keep their Instance Number order.
An enhanced multi-frame instance (Enhanced CT/MR, Legacy Converted Enhanced) is read the same way from its
functional groups (PS3.3 C.7.6.16): each frame's Plane Position, the Plane Orientation, Pixel Measures and
Pixel Value Transformation (rescale), per frame where given, else shared.
Raises :class:`VolumeError` (a ``ValueError``) when the slices do not share rows x columns or there are none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixel_array

__all__ = ["Volume", "VolumeError", "assemble_volume", "multiframe_layout", "slice_normal"]


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
    return _normal(ds.get("ImageOrientationPatient"))


def _normal(orientation: Sequence[float] | None) -> np.ndarray | None:
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
        return _multiframe_volume(datasets[0], modality)
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


def _frame_group(ds: pydicom.Dataset, frame: int, keyword: str) -> pydicom.Dataset | None:
    """The first item of functional group ``keyword`` for ``frame`` (0-based): the frame's own, else the
    shared one; None for a multi-frame instance without functional groups (e.g. an old NM or US cine)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for groups in ((per_frame[frame] if per_frame and frame < len(per_frame) else None),
                   (shared[0] if shared else None)):
        items = groups.get(keyword) if groups is not None else None
        if items:
            return items[0]
    return None


def _frame_values(ds: pydicom.Dataset, raw: np.ndarray, frame: int) -> np.ndarray:
    """One frame's modality values: its Pixel Value Transformation's rescale, else the instance's Modality LUT."""
    transform = _frame_group(ds, frame, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform:
        slope, intercept = float(transform.RescaleSlope), float(transform.get("RescaleIntercept", 0) or 0)
        return raw[frame].astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return apply_modality_lut(raw[frame], ds).astype(np.float32, copy=False)


def multiframe_layout(ds: pydicom.Dataset) -> tuple[list[int], tuple[float, float, float]]:
    """How a multi-frame instance's frames lie: the 0-based frame indices in volume order (along the slice
    normal by each frame's Plane Position; frame order when a position is missing), and the voxel spacing
    in mm (slice, row, column) from the positions and Pixel Measures."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    oriented = _frame_group(ds, 0, "PlaneOrientationSequence")
    normal = _normal((oriented or ds).get("ImageOrientationPatient"))
    placed = [_frame_group(ds, i, "PlanePositionSequence") for i in range(frames)]
    positions = [float(np.dot(np.asarray(p.ImagePositionPatient, dtype=float), normal))
                 if normal is not None and p is not None and len(p.get("ImagePositionPatient") or ()) == 3 else None
                 for p in placed]
    measures = _frame_group(ds, 0, "PixelMeasuresSequence") or ds
    if frames > 1 and all(p is not None for p in positions):
        order = sorted(range(frames), key=lambda i: (positions[i], i))
        between = float(np.median(np.diff(np.asarray([positions[i] for i in order], dtype=float))))
    else:
        order = list(range(frames))
        between = float(measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or 1.0)
    rows_cols = _pixel_spacing(measures if "PixelSpacing" in measures else ds)
    return order, (abs(between) or 1.0, *rows_cols)


def _multiframe_volume(ds: pydicom.Dataset, modality: str) -> Volume:
    """One multi-frame instance as a volume: frames sorted along the slice normal by their positions."""
    raw = decode_pixel_array(ds)
    raw = raw[None] if raw.ndim == 2 else raw
    order, spacing = multiframe_layout(ds)
    if len(order) != raw.shape[0]:
        raise VolumeError(f"Number of Frames says {len(order)} but the pixel data holds {raw.shape[0]} frames")
    voxels = np.stack([_frame_values(ds, raw, i) for i in order])
    return Volume(voxels, spacing, [str(ds.SOPInstanceUID)] * len(order), modality)
