"""A tiny CT-like series for segmentation tests: pydicom's CT_small as slices 2.5 mm apart, and a label map."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from integration.db.tables import DicomInstance

CT_SMALL = str(get_testdata_file("CT_small.dcm"))
SLICE_STEP_MM = 2.5  # CT_small says Slice Thickness 5 mm: the volume must come from the positions


@dataclass(frozen=True)
class Segmentation:
    """The fields of inference.imaging.outputs.SegmentationOutput (the bundle operator's result)."""

    label_map: np.ndarray
    source_sop_instance_uids: list[str]
    labels: dict[int, str]
    model_name: str = "tiny-organ-seg"
    model_version: str = "0.2.0"


def ct_series(folder: Path, slices: int = 4) -> list[Dataset]:
    """``slices`` CT images of one series (CT_small's study, patient and frame of reference), each written to
    ``folder`` (its path in ``filename``), listed from the lowest slice up."""
    source = pydicom.dcmread(CT_SMALL)
    series_uid = generate_uid()
    x, y, z = (float(v) for v in source.ImagePositionPatient)
    out: list[Dataset] = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(slices):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x, y, z + SLICE_STEP_MM * i]
        path = folder / f"slice{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ds.filename = str(path)
        out.append(ds)
    return out


def liver_and_lesion(series: list[Dataset]) -> Segmentation:
    """Label 1 'liver' on slices 1-2 (2 x 10 x 20 voxels) and label 4 'lesion' on slice 2 (5 x 6): value 4 so
    that the SEG must renumber its segments 1, 2."""
    label_map = np.zeros((len(series), int(series[0].Rows), int(series[0].Columns)), dtype=np.uint8)
    label_map[1:3, 10:20, 10:30] = 1
    label_map[2, 50:55, 60:66] = 4
    return Segmentation(label_map, [str(ds.SOPInstanceUID) for ds in series], {1: "liver", 4: "lesion"})


def voxel_ml(series: list[Dataset]) -> float:
    row, col = (float(v) for v in series[0].PixelSpacing)
    return row * col * SLICE_STEP_MM / 1000.0


def stored_instance(ds: Dataset) -> DicomInstance:
    """The store's row for a slice written by ct_series."""
    return DicomInstance(sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=ds.StudyInstanceUID,
                         series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
                         transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, modality=ds.Modality,
                         patient_id=None, is_image=True, path=ds.filename, size=Path(ds.filename).stat().st_size)
