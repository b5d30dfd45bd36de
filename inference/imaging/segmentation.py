"""Segmentation results as a DICOM Segmentation (highdicom) and the volumes the report states.

Contract:

* :func:`build_seg` turns a label map (``uint8 [slices, rows, cols]``, one slice per source instance, in the
  order of ``source_sop_instance_uids``; 0 is background, each other value a label) and the source
  instances' headers into a BINARY DICOM SEG in the source study, with one segment per label: a label map is
  exclusive (one label per voxel), so a voxel is in a segment or not, and BINARY is what every PACS and viewer
  reads (FRACTIONAL is for probabilities, which a label map no longer holds). Each segment is coded with
  SNOMED CT (:func:`segment_codes`), and names the model as its algorithm.
* :func:`measure_segments` counts each label's voxels and gives its volume in mL from the headers' spacing.
* :func:`record_segmentation` does both for the imaging worker, stores the SEG in the artifact store (by id,
  so the report writer and the PACS export read it from the database) and returns the
  :class:`~schemas.events.SegmentationFinding` that goes into the ImagingInferenceCompleted event; the report
  writer turns it into Observations (integration.reports.segmentation) and the PACS export sends the SEG
  beside the SR (integration.delivery.pacs).

``output`` is any object with the attributes of :class:`SegmentationLike` (the bundle operator's
``SegmentationOutput``). Errors in the input raise :class:`SegmentationInputError` with what to fix.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import DeflatedExplicitVRLittleEndian

from inference.imaging.volume import multiframe_layout
from integration.db.artifacts import put_artifact
from integration.db.store import Store
from integration.db.tables import stable_id
from integration.fhir.resources import DCM_SYSTEM
from integration.phi import uid_hash
from schemas.events import CodedConcept, SegmentationFinding, SegmentMeasurement

log = logging.getLogger(__name__)

MANUFACTURER = "MedBridge"
SEG_SERIES_NUMBER = 9903  # beside the SR (9901) and SC (9902) of integration.delivery.pacs.export
SEG_MEDIA_TYPE = "application/dicom"
SNOMED_SYSTEM = "http://snomed.info/sct"
_FHIR_SYSTEMS = {"SCT": SNOMED_SYSTEM, "DCM": DCM_SYSTEM}
PRELIMINARY_STATEMENT = (
    "AI-generated, preliminary segmentation from a model; it has not been reviewed by a clinician."
)


class SegmentationInputError(ValueError):
    """The label map does not fit its source instances or its labels; the message says what to fix."""


class SegmentationLike(Protocol):
    """What a segmentation operator returns (``inference.imaging.outputs.SegmentationOutput``)."""

    @property
    def label_map(self) -> np.ndarray: ...  # uint8 [slices, rows, cols]

    @property
    def source_sop_instance_uids(self) -> list[str]: ...  # ordered like the slices

    @property
    def labels(self) -> dict[int, str]: ...  # label value -> name, e.g. {1: "liver"}

    @property
    def model_name(self) -> str: ...

    @property
    def model_version(self) -> str: ...


# codes ------------------------------------------------------------------------------------------------
def _keyword(label: str) -> str:
    """'left_kidney' -> 'LeftKidney': the form of pydicom's code dictionary keywords."""
    return "".join(w[:1].upper() + w[1:].lower() for w in re.split(r"[^A-Za-z0-9]+", label) if w)


def segment_codes(label: str) -> tuple[Code, Code]:
    """The segmented property (category, type) of a label, in SNOMED CT (PS3.16 CID 7150 / 7151).

    A label that names an abnormal structure (CID 7159: lesion, nodule, mass, ...) is a Morphologically
    Abnormal Structure; a tissue type (CID 7166) a Tissue; any other structure of CID 7151 (organs and
    anatomy: liver, kidney, lung, ...) an Anatomical Structure. A label that names none of them is coded as
    generic Tissue (its own name stays the segment label), so the SEG is valid whatever the model calls it."""
    keyword = _keyword(label)
    if keyword in codes.cid7159.dir():
        return codes.SCT.MorphologicallyAbnormalStructure, getattr(codes.cid7159, keyword)
    if keyword in codes.cid7166.dir():
        return codes.SCT.Tissue, getattr(codes.cid7166, keyword)
    if keyword in codes.cid7151.dir():
        return codes.SCT.AnatomicalStructure, getattr(codes.cid7151, keyword)
    return codes.SCT.Tissue, codes.SCT.Tissue


def fhir_concept(code: Code) -> CodedConcept:
    """A DICOM code as FHIR names it (SNOMED CT as http://snomed.info/sct)."""
    return CodedConcept(system=_FHIR_SYSTEMS.get(code.scheme_designator, code.scheme_designator),
                        code=code.value, display=code.meaning)


# geometry ---------------------------------------------------------------------------------------------
def ordered_sources(output: SegmentationLike, sources: Mapping[str, Dataset]) -> list[Dataset]:
    """The source headers in slice order; checks the label map's shape against them."""
    uids = list(output.source_sop_instance_uids)
    missing = [u for u in uids if u not in sources]
    if missing:
        raise SegmentationInputError(
            f"{len(missing)} of the {len(uids)} source instances of the segmentation are not stored "
            f"(first: {uid_hash(missing[0])}); segment only instances of the study")
    label_map = np.asarray(output.label_map)
    if label_map.ndim != 3 or label_map.shape[0] != len(uids):
        raise SegmentationInputError(
            f"the label map has shape {label_map.shape}; it must be [slices, rows, cols] with one slice per "
            f"source instance ({len(uids)})")
    # a volume from one multi-frame instance names that instance under each of its slices
    ordered = [sources[uids[0]]] if _frames_of_one_instance(uids, sources) else [sources[u] for u in uids]
    for ds in ordered:
        if (int(ds.Rows), int(ds.Columns)) != label_map.shape[1:]:
            raise SegmentationInputError(
                f"a source instance is {ds.Rows}x{ds.Columns} but the label map's slices are "
                f"{label_map.shape[1]}x{label_map.shape[2]}; resample the label map to the source geometry")
    return ordered


def _frames_of_one_instance(uids: Sequence[str], sources: Mapping[str, Dataset]) -> bool:
    return len(uids) > 1 and len(set(uids)) == 1 and _multiframe(sources[uids[0]]) == len(uids)


def _multiframe(ds: Dataset) -> int:
    """The frame count of a multi-frame source (0 for a single-frame one)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return frames if frames > 1 else 0


def _slice_normal(ds: Dataset) -> np.ndarray | None:
    iop = [float(v) for v in ds.get("ImageOrientationPatient") or []]
    if len(iop) != 6:
        return None
    return np.cross(np.array(iop[:3]), np.array(iop[3:]))


def slice_spacing_mm(sources: Sequence[Dataset]) -> float:
    """The distance between neighbouring slices: from Image Position (Patient) along the slice normal when
    there are two or more slices (what the voxels really span, gaps and overlaps included), else Spacing
    Between Slices, else Slice Thickness."""
    normal = _slice_normal(sources[0])
    positions = [ds.get("ImagePositionPatient") for ds in sources]
    if len(sources) > 1 and normal is not None and all(p is not None and len(p) == 3 for p in positions):
        along = np.sort([float(np.dot(normal, [float(v) for v in p])) for p in positions])  # type: ignore[union-attr]
        steps = np.diff(along)
        if np.all(steps > 1e-3):
            return float(np.median(steps))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = sources[0].get(keyword)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    raise SegmentationInputError(
        "the source instances give no slice spacing (no distinct Image Position (Patient), Spacing Between "
        "Slices or Slice Thickness); the segmentation's volume cannot be measured")


def voxel_volume_ml(sources: Sequence[Dataset]) -> float:
    """One voxel's volume in mL: Pixel Spacing (row x column, mm) x slice spacing (mm) / 1000."""
    if len(sources) == 1 and _multiframe(sources[0]):
        _, (between, row, column) = multiframe_layout(sources[0])  # from its functional groups
        return between * row * column / 1000.0
    spacing = sources[0].get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        raise SegmentationInputError("the source instances have no Pixel Spacing; the volume cannot be measured")
    return float(spacing[0]) * float(spacing[1]) * slice_spacing_mm(sources) / 1000.0


def _checked_labels(output: SegmentationLike) -> list[tuple[int, str]]:
    """The labels by value, checked against the values the label map holds."""
    labels = sorted((int(v), str(name)) for v, name in output.labels.items())
    if not labels or any(not 1 <= v <= 255 for v, _ in labels):
        raise SegmentationInputError("labels must name label values 1..255 (0 is background), at least one")
    present = {int(v) for v in np.unique(np.asarray(output.label_map))} - {0}
    unnamed = present - {v for v, _ in labels}
    if unnamed:
        raise SegmentationInputError(
            f"the label map holds values {sorted(unnamed)} that labels does not name; name every label value")
    return labels


def measure_segments(output: SegmentationLike, sources: Sequence[Dataset]) -> list[SegmentMeasurement]:
    """Each label's segment (numbered 1.. in label order, as in the SEG), voxel count and volume in mL."""
    label_map = np.asarray(output.label_map)
    voxel_ml = voxel_volume_ml(sources)
    counts = np.bincount(label_map.ravel(), minlength=256)
    out = []
    for number, (value, name) in enumerate(_checked_labels(output), start=1):
        _, structure = segment_codes(name)
        count = int(counts[value])
        out.append(SegmentMeasurement(segment_number=number, label=name, body_site=fhir_concept(structure),
                                      voxel_count=count, volume_ml=round(count * voxel_ml, 3)))
    return out


# the SEG ------------------------------------------------------------------------------------------------
def build_seg(output: SegmentationLike, sources: Sequence[Dataset], *, series_instance_uid: str,
              sop_instance_uid: str) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of the label map over ``sources`` (the headers of the source instances, in slice
    order: :func:`ordered_sources`), in their study and frame of reference, one segment per label (empty
    frames left out). Raises SegmentationInputError when the label map does not fit its labels."""
    labels = _checked_labels(output)
    # segment numbers must run 1..n (PS3.3 C.8.20.2): label values may skip, so renumber them in order
    renumber = np.zeros(256, dtype=np.uint8)
    for number, (value, _) in enumerate(labels, start=1):
        renumber[value] = number
    pixels = renumber[np.asarray(output.label_map, dtype=np.uint8)]
    if len(sources) == 1 and _multiframe(sources[0]) == pixels.shape[0]:
        # the label map runs along the slice normal; a SEG over one multi-frame source runs in its frame order
        order, _ = multiframe_layout(sources[0])
        framed = np.empty_like(pixels)
        framed[order] = pixels
        pixels = framed
    algorithm = hd.AlgorithmIdentificationSequence(
        name=output.model_name[:64], family=codes.cid7162.ArtificialIntelligence, version=output.model_version[:64])
    descriptions = []
    for number, (_, name) in enumerate(labels, start=1):
        category, structure = segment_codes(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=structure, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=output.model_name[:64],
        software_versions=output.model_version[:64],
        device_serial_number="not applicable",  # software, not a device: DICOM still wants a value (Type 1)
        content_label="AI_SEGMENTATION",
        content_description=f"{output.model_name} {output.model_version}"[:64],
        series_description="AI segmentation (preliminary)",
    )
    seg.ImageComments = PRELIMINARY_STATEMENT
    return seg


def seg_file_bytes(seg: Dataset) -> bytes:
    """The SEG as a Part 10 file, deflated (Deflated Explicit VR Little Endian): a binary mask is mostly
    runs of zeros, and deflating keeps a whole-CT SEG well within the artifact store's size limit."""
    built_as = seg.file_meta.TransferSyntaxUID
    seg.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    try:
        seg.save_as(buffer, enforce_file_format=True)
    finally:
        seg.file_meta.TransferSyntaxUID = built_as
    return buffer.getvalue()


def segmentation_uid(study_uid: str, revision: int, source_series_uid: str, model_name: str, part: str) -> str:
    """A UID fixed by what was segmented (study revision, series, model) and ``part`` ('seg-series' or
    'seg-instance'): a redelivered study makes the same SEG, which the PACS keeps one copy of. The 2.25 form
    of a name-based UUID (PS3.5 B.2)."""
    name = stable_id("segmentation", study_uid, str(revision), source_series_uid, model_name, part)
    return f"2.25.{uuid.UUID(name).int}"


def _stored_headers(store: Store, study_uid: str, wanted: Sequence[str]) -> dict[str, Dataset]:
    paths = {i.sop_instance_uid: i.path for i in store.study_instances(study_uid)}
    return {u: pydicom.dcmread(paths[u], stop_before_pixels=True) for u in set(wanted) if u in paths}


def record_segmentation(store: Store, output: SegmentationLike, *, study_instance_uid: str, revision: int,
                        sources: Mapping[str, Dataset] | None = None) -> SegmentationFinding:
    """Build the SEG of a segmentation result, store it in the artifact store and measure its segments; the
    :class:`SegmentationFinding` to put in the study's ImagingInferenceCompleted event (``segmentations``).

    ``sources``: the source instances' datasets by SOP Instance UID when the caller has them already; without
    them the headers are read from the study's stored instances. The SEG is committed before the event that
    names it (its own transaction), as the heatmaps are. Raises SegmentationInputError for a label map that
    does not fit its sources or labels."""
    if sources is None:
        sources = _stored_headers(store, study_instance_uid, output.source_sop_instance_uids)
    ordered = ordered_sources(output, sources)
    source_series = str(ordered[0].SeriesInstanceUID)
    series_uid = segmentation_uid(study_instance_uid, revision, source_series, output.model_name, "seg-series")
    sop_uid = segmentation_uid(study_instance_uid, revision, source_series, output.model_name, "seg-instance")
    segments = measure_segments(output, ordered)
    seg = build_seg(output, ordered, series_instance_uid=series_uid, sop_instance_uid=sop_uid)
    with store.session() as s:
        aid = put_artifact(s, seg_file_bytes(seg), SEG_MEDIA_TYPE)
    log.info("segmentation of study %s by %s stored (%d segments, %d frames)", uid_hash(study_instance_uid),
             output.model_name, len(segments), int(seg.NumberOfFrames))
    return SegmentationFinding(seg_artifact_id=aid, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                               source_series_instance_uid=source_series, model_name=output.model_name,
                               model_version=output.model_version, segments=segments)
