"""Imaging pipeline throughput against the bare network forward on the same images, and per-study latency.

Builds an N-image CT-like series (pydicom's 693_UNCR head CT, 512 x 512, each slice with its own noise and
half with a synthetic lesion) as DICOM files, then times, in this one process:

  bare forward b1   the demo network's forward alone on the prepared inputs, one image per call
  bare forward b32  the same, 32 images per call
  per-image explain the shape of the pipeline before bundles: decode, score and Grad-CAM + 3 PNGs per image
  pipeline          the worker's path (StudyRun.classify_series + explanations): read, decode, bundle
                    preprocessing, batched forward, Grad-CAM overlays for the top 3 images only

The ratio is each row's time per image over the bare forward b1's. Usage (the demo bundle is trained quick if
none is given):

    PYTHONPATH=$PWD python bench/imaging_pipeline.py [--n 300] [--bundle var/models/demo-lesion-densenet]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from inference.imaging.bundle import load_bundle
from inference.imaging.operator import BundleOperator
from inference.imaging.pixels import dataset_to_image
from inference.imaging.train import insert_synthetic_lesion
from inference.imaging.worker import SeriesMember, StudyRun


def make_series(folder: Path, n: int) -> list[SeriesMember]:
    base = pydicom.dcmread(get_testdata_file("693_UNCR.dcm", download=False))
    image = dataset_to_image(base)
    rng = np.random.default_rng(0)
    series, members = generate_uid(), []
    for i in range(n):
        slice_image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)
        if i % 2:
            slice_image = insert_synthetic_lesion(slice_image, (200 + i % 100, 250), 40.0, 0.5, rng)
        ds = base.copy()
        ds.PixelData = (slice_image * 4095).round().astype(np.uint16).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, 0, 2048, 4096
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path)
        members.append(SeriesMember(ds.SOPInstanceUID, series, str(path),
                                    pydicom.dcmread(path, stop_before_pixels=True)))
    return members


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medbridge-imaging-bench-") as tmp:
        folder = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            from inference.imaging.train import train_demo_model

            bundle = folder / "demo-bundle"
            train_demo_model(bundle, quick=True, log=lambda _m: None)
        op = BundleOperator(load_bundle(bundle, args.device), batch_size=32)
        members = make_series(folder, args.n)
        inputs = [op.model_input(dataset_to_image(pydicom.dcmread(m.path))) for m in members]
        op.classify_inputs(inputs[:32])  # warm-up

        def bare(batch: int) -> None:
            for start in range(0, len(inputs), batch):
                out = op.forward(torch.stack(inputs[start:start + batch]))
            if out.is_cuda:
                torch.cuda.synchronize()

        def per_image() -> None:
            for m in members:
                op.run_dataset(pydicom.dcmread(m.path))

        stored: dict[str, bytes] = {}

        def pipeline() -> None:
            # the worker reads the headers first (routing), then decodes each image once
            study = [SeriesMember(m.sop_instance_uid, m.series_instance_uid, m.path,
                                  pydicom.dcmread(m.path, stop_before_pixels=True)) for m in members]
            run = StudyRun(explain_top=3)
            run.classify_series(study, [op])
            heatmaps = run.explanations(lambda png: stored.setdefault(str(len(stored)), png) and str(len(stored)))
            assert len(run.probabilities) == len(members) and len(heatmaps) == 3

        rows = [
            ("bare forward b1", timed(lambda: bare(1))),
            ("bare forward b32", timed(lambda: bare(32))),
            ("pipeline (top-3 explained)", timed(pipeline)),
            ("per-image explain (before)", timed(per_image)),
        ]
        base = rows[0][1]
        print(f"device {op.bundle.device}, {args.n} images 512x512, torch threads {torch.get_num_threads()}")
        print(f"{'path':<28} {'total s':>8} {'images/s':>9} {'x bare b1':>10}")
        for name, seconds in rows:
            print(f"{name:<28} {seconds:8.2f} {args.n / seconds:9.1f} {seconds / base:10.2f}")


if __name__ == "__main__":
    main()
