"""A label map over a real CT series becomes a DICOM SEG that highdicom and pydicom read back as built, with
SNOMED-coded segments and volumes from the headers' geometry."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage, generate_uid

from inference.imaging.segmentation import (
    SegmentationInputError,
    build_seg,
    measure_segments,
    ordered_sources,
    seg_file_bytes,
    segment_codes,
    voxel_volume_ml,
)
from tests.inference.imaging.ct_series import Segmentation, ct_series, liver_and_lesion, voxel_ml


def built_seg(tmp_path: Path) -> tuple[list[pydicom.Dataset], Segmentation, bytes]:
    series = ct_series(tmp_path)
    output = liver_and_lesion(series)
    ordered = ordered_sources(output, {str(ds.SOPInstanceUID): ds for ds in reversed(series)})
    seg = build_seg(output, ordered, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())
    return series, output, seg_file_bytes(seg)


def test_the_seg_reads_back_with_pydicom_and_highdicom_as_built(tmp_path: Path) -> None:
    series, output, data = built_seg(tmp_path)

    ds = pydicom.dcmread(io.BytesIO(data))
    assert (ds.SOPClassUID, ds.Modality, ds.SegmentationType) == (SegmentationStorage, "SEG", "BINARY")
    assert ds.StudyInstanceUID == series[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "lesion"]
    assert int(ds.NumberOfFrames) == 3  # liver on slices 1 and 2, lesion on slice 2: empty frames left out
    referenced = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(s.SOPInstanceUID) for s in series}

    seg = hd.seg.Segmentation.from_dataset(ds)
    assert seg.number_of_segments == 2
    liver, lesion = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (liver.segmented_property_category, liver.segmented_property_type) == (
        codes.SCT.AnatomicalStructure, codes.SCT.Liver)
    assert (lesion.segmented_property_category, lesion.segmented_property_type) == (
        codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)
    assert liver.algorithm_identification is not None
    algorithm = liver.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (output.model_name, output.model_version)
    # the masks come back where the label map put them, segment numbers 1 and 2 for label values 1 and 4
    uids = output.source_sop_instance_uids
    masks = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    expected = np.where(output.label_map == 4, 2, output.label_map)
    assert np.array_equal(masks, expected)
    assert hd.seg.segread(io.BytesIO(data)).SOPInstanceUID == ds.SOPInstanceUID


def test_volumes_are_voxel_counts_times_the_voxel_size_from_the_slice_positions(tmp_path: Path) -> None:
    series = ct_series(tmp_path)
    output = liver_and_lesion(series)
    liver, lesion = measure_segments(output, series)
    assert (liver.segment_number, liver.label, liver.voxel_count) == (1, "liver", 2 * 10 * 20)
    assert (lesion.segment_number, lesion.label, lesion.voxel_count) == (2, "lesion", 5 * 6)
    assert liver.volume_ml == pytest.approx(400 * voxel_ml(series), abs=1e-3)
    assert lesion.volume_ml == pytest.approx(30 * voxel_ml(series), abs=1e-3)
    assert (liver.body_site.system, liver.body_site.code) == ("http://snomed.info/sct", "10200004")
    # one slice has no neighbour: its thickness (5 mm) is the spacing
    (only,) = ct_series(tmp_path / "one", slices=1)
    assert voxel_volume_ml([only]) == pytest.approx(float(only.PixelSpacing[0]) ** 2 * 5.0 / 1000)


def test_labels_are_coded_in_snomed_or_as_generic_tissue() -> None:
    assert segment_codes("Liver") == (codes.SCT.AnatomicalStructure, codes.SCT.Liver)
    assert segment_codes("nodule") == (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule)
    assert segment_codes("adipose_tissue") == (codes.SCT.Tissue, codes.SCT.AdiposeTissue)
    assert segment_codes("region of interest 7") == (codes.SCT.Tissue, codes.SCT.Tissue)


def test_a_label_map_that_does_not_fit_its_sources_or_labels_is_refused(tmp_path: Path) -> None:
    series = ct_series(tmp_path, slices=3)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series}
    good = liver_and_lesion(series)
    with pytest.raises(SegmentationInputError, match="one slice per source instance"):
        ordered_sources(Segmentation(good.label_map[:2], good.source_sop_instance_uids, good.labels), by_uid)
    with pytest.raises(SegmentationInputError, match="resample"):
        ordered_sources(Segmentation(good.label_map[:, :64], good.source_sop_instance_uids, good.labels), by_uid)
    with pytest.raises(SegmentationInputError, match="not stored"):
        ordered_sources(good, dict(list(by_uid.items())[:2]))
    with pytest.raises(SegmentationInputError, match=r"values \[4\] that labels does not name"):
        measure_segments(Segmentation(good.label_map, good.source_sop_instance_uids, {1: "liver"}), series)


def test_a_seg_over_one_enhanced_multiframe_source_puts_each_mask_on_its_source_frame(tmp_path: Path) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    from inference.imaging.volume import assemble_volume

    series = ct_series(tmp_path)
    # highdicom's converter writes the highest slice first: frame order is not volume order
    enhanced = LegacyConvertedEnhancedCTImage(series, series_instance_uid=generate_uid(), series_number=7,
                                              sop_instance_uid=generate_uid(), instance_number=1)
    buffer = io.BytesIO()
    enhanced.save_as(buffer, enforce_file_format=True)
    enhanced = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    volume = assemble_volume([enhanced])
    by_slices = liver_and_lesion(series)  # the label map of the same anatomy, lowest slice first
    output = Segmentation(by_slices.label_map, volume.sop_instance_uids, by_slices.labels)

    ordered = ordered_sources(output, {str(enhanced.SOPInstanceUID): enhanced})
    assert ordered == [enhanced]
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(seg_file_bytes(build_seg(
        output, ordered, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())))))
    # the converter chose its own frame order: find each slice's frame by its position
    frame_at = {round(float(f.PlanePositionSequence[0].ImagePositionPatient[2]), 2): n
                for n, f in enumerate(enhanced.PerFrameFunctionalGroupsSequence, start=1)}
    frames_low_to_high = [frame_at[round(float(ds.ImagePositionPatient[2]), 2)] for ds in series]
    assert sorted(frames_low_to_high) == [1, 2, 3, 4] and frames_low_to_high != [1, 2, 3, 4]  # reordering matters
    for depth, ds in enumerate(series):  # each slice's mask lies on the frame that holds that slice
        frame = frame_at[round(float(ds.ImagePositionPatient[2]), 2)]
        mask = seg.get_pixels_by_source_frame(str(enhanced.SOPInstanceUID), [frame],
                                              combine_segments=True, relabel=False,
                                              assert_missing_frames_are_empty=True)[0]
        assert np.array_equal(mask, np.where(output.label_map[depth] == 4, 2, output.label_map[depth]))
    liver, lesion = measure_segments(output, ordered)  # spacing from the functional groups and frame positions
    assert liver.volume_ml == pytest.approx(400 * voxel_ml(series), abs=1e-3)
    assert lesion.volume_ml == pytest.approx(30 * voxel_ml(series), abs=1e-3)
