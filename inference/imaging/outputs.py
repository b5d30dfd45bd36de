"""What an imaging bundle produces beyond per-image probabilities, in shapes other packages build on.

:class:`SegmentationOutput` is the contract with the DICOM SEG / FHIR Observation builder
(``inference/imaging/segmentation.py``): a label map aligned slice for slice with the source instances.
No torch here, so its readers need not import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SegmentationOutput"]


@dataclass(frozen=True)
class SegmentationOutput:
    """A segmentation bundle's answer for one series.

    Attributes:
        label_map: uint8 array ``[slices, rows, cols]``; 0 is background, ``k`` is ``labels[k]``. Slice ``i``
            lies on ``source_sop_instance_uids[i]`` at that instance's rows x columns.
        source_sop_instance_uids: the SOP Instance UID under each slice, in slice order (sorted along the slice
            normal by Image Position Patient); a multi-frame source repeats its UID once per frame.
        labels: label value -> name (background excluded), from the bundle's ``channel_def``.
        model_name, model_version: the bundle's metadata ``name`` and ``version``.
    """

    label_map: np.ndarray = field(repr=False)
    source_sop_instance_uids: list[str]
    labels: dict[int, str]
    model_name: str
    model_version: str

    def __post_init__(self) -> None:
        if self.label_map.ndim != 3 or self.label_map.dtype != np.uint8:
            raise ValueError(f"label_map must be uint8 [slices, rows, cols], got {self.label_map.dtype} "
                             f"{self.label_map.shape}")
        if self.label_map.shape[0] != len(self.source_sop_instance_uids):
            raise ValueError("one source SOP Instance UID per slice of the label map")
