"""Imaging pipeline throughput against the bare network forward on the same images, and per-study latency.

Builds an N-image CT-like series (pydicom's 693_UNCR head CT, 512 x 512, each slice with its own noise and
half with a synthetic lesion) as DICOM files recorded in a SQLite store, as the DICOM listener records them,
then times, in this one process and interleaved round by round (the host's load moves between rounds):

  bare forward b32  the demo network's forward alone on the prepared inputs, 32 images per call (the
                    pipeline's own batch size: the fastest the network goes on these images)
  bare forward b1   the same, one image per call (--b1; the baseline of the first figures)
  pipeline          the imaging worker's whole path, ``analyse_study``: the instances read from the store,
                    their headers, each image decoded and windowed, the bundle's preprocessing, the batched
                    forward, Grad-CAM overlays and heatmap layers for the top 3 images stored as artifacts in
                    the database, and the result event built

The ratio is the pipeline's throughput over the bare forward's, median of the rounds (the issue's target:
within 1.2x, i.e. >= 0.83). Then per-study latency (p50/p95 of ``analyse_study``) for a one-image CR study
(pydicom's RG1_UNCR, 1955 x 1841) and a 60-slice CT series.

``--network demo`` (the default) runs the demo bundle (a 64 x 64 DenseNet, trained quick if ``--bundle`` names
none); ``--network densenet121`` writes, offline and at run time, a bundle of production size: MONAI's
``DenseNet121(spatial_dims=2, in_channels=1, out_channels=14)`` with random weights at 224 x 224, the 14
ChestX-ray14 findings, MONAI's own preprocessing (longest side resized to 224, padded square, ImageNet
intensity normalisation), sigmoid outputs and Grad-CAM on ``class_layers.relu``, as a chest X-ray bundle ships.
It is routed to every series here, the CT series included (a real chest model would be routed to CR/DX), so
that both paths see the same inputs. Usage:

    PYTHONPATH=$PWD python bench/imaging_pipeline.py [--n 300] [--rounds 3] [--bundle var/models/demo-lesion-densenet]
    PYTHONPATH=$PWD python bench/imaging_pipeline.py --network densenet121 --n 96 --latency-runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from inference.imaging.bundle import load_bundle
from inference.imaging.operator import BundleOperator
from inference.imaging.pixels import dataset_to_image
from inference.imaging.registry import ModelRegistry, RoutingRule
from inference.imaging.train import insert_synthetic_lesion
from inference.imaging.worker import analyse_study
from integration.db.store import Store
from integration.db.tables import utcnow
from schemas.events import StudyReceived


def _row(ds: pydicom.Dataset, path: Path) -> dict[str, object]:
    """The store's columns for an instance written at ``path``, as the DICOM listener records it."""
    return {"sop_instance_uid": ds.SOPInstanceUID, "study_instance_uid": ds.StudyInstanceUID,
            "series_instance_uid": ds.SeriesInstanceUID, "sop_class_uid": ds.SOPClassUID,
            "transfer_syntax_uid": ds.file_meta.TransferSyntaxUID, "modality": ds.Modality, "patient_id": None,
            "is_image": True, "path": str(path), "size": path.stat().st_size, "received_at": utcnow()}


def make_ct_study(store: Store, folder: Path, n: int) -> tuple[StudyReceived, list[Path]]:
    base = pydicom.dcmread(get_testdata_file("693_UNCR.dcm", download=False))
    image = dataset_to_image(base)
    rng = np.random.default_rng(0)
    study, series, rows, paths = generate_uid(), generate_uid(), [], []
    for i in range(n):
        slice_image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)
        if i % 2:
            slice_image = insert_synthetic_lesion(slice_image, (200 + i % 100, 250), 40.0, 0.5, rng)
        ds = base.copy()
        ds.PixelData = (slice_image * 4095).round().astype(np.uint16).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, 0, 2048, 4096
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        path = folder / f"{study[-12:]}-{i:04d}.dcm"
        ds.save_as(path)
        rows.append(_row(ds, path))
        paths.append(path)
    store.add_instances(rows)
    return StudyReceived(study_instance_uid=study, revision=1, instance_count=n), paths


def make_cr_study(store: Store, folder: Path) -> StudyReceived:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm", download=False))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / "cr.dcm"
    ds.save_as(path)
    store.add_instances([_row(ds, path)])
    return StudyReceived(study_instance_uid=ds.StudyInstanceUID, revision=1, instance_count=1)


CHEST_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                  "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
PRODUCTION_SIZE = 224


def write_production_bundle(folder: Path) -> Path:
    """A MONAI bundle of production size at ``folder`` (see the module docstring), random weights (seed 0)."""
    import monai
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(CHEST_FINDINGS))
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    inference = {
        "imports": ["$import torch"],
        "network_def": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1,
                        "out_channels": len(CHEST_FINDINGS)},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Resized", "keys": "image", "spatial_size": PRODUCTION_SIZE, "size_mode": "longest",
             "mode": "area"},
            {"_target_": "SpatialPadd", "keys": "image", "spatial_size": [PRODUCTION_SIZE, PRODUCTION_SIZE]},
            {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": 0.485, "divisor": 0.229},
        ]},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]},
    }
    metadata = {
        "version": "0.0.1", "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": {},
        "name": "bench-chest-densenet121", "task": "Chest radiograph findings (random weights: benchmark only)",
        "description": "DenseNet121 at 224 x 224, 14 ChestX-ray14 findings, random weights",
        "authors": "MedBridge bench", "copyright": "none", "intended_use": "Benchmark only: random weights",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CR", "num_channels": 1,
                                 "spatial_shape": [PRODUCTION_SIZE, PRODUCTION_SIZE], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classification",
                                 "num_channels": len(CHEST_FINDINGS), "spatial_shape": [1], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {str(i): name for i, name in enumerate(CHEST_FINDINGS)}}},
        },
        "medbridge": {"explain": {"method": "gradcam", "target_layer": "class_layers.relu"}, "letterbox": True,
                      "pixels": "display", "activation": "sigmoid"},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=2), encoding="utf-8")
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return folder


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds (this process, every thread) of ``fn()``: on a shared host the wall time is mostly
    waiting for a core, the CPU time is the work done."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="images in the throughput study (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each path (default 3)")
    parser.add_argument("--latency-runs", type=int, default=10, help="runs per latency study (default 10)")
    parser.add_argument("--b1", action="store_true", help="also time the bare forward one image per call")
    parser.add_argument("--bundle", type=Path, help="the demo bundle's folder (default: trained quick now)")
    parser.add_argument("--network", choices=("demo", "densenet121"), default="demo",
                        help="demo: the demo bundle; densenet121: a production-size bundle written now")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for every path (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="medbridge-imaging-bench-") as tmp:
        folder = Path(tmp)
        bundle = args.bundle
        if args.network == "densenet121":
            bundle = write_production_bundle(folder / "chest-densenet121")
        elif bundle is None:
            from inference.imaging.train import train_demo_model

            bundle = folder / "demo-bundle"
            train_demo_model(bundle, quick=True, log=lambda _m: None)
        op = BundleOperator(load_bundle(bundle, args.device), batch_size=32)
        registry = ModelRegistry([(op, RoutingRule())])
        store = Store(f"sqlite:///{folder / 'bench.db'}")
        store.start()
        study, paths = make_ct_study(store, folder, args.n)
        inputs = [op.model_input(dataset_to_image(pydicom.dcmread(p))) for p in paths]
        op.classify_inputs(inputs[:32])  # warm-up

        def bare(batch: int) -> None:
            for start in range(0, len(inputs), batch):
                out = op.forward(torch.stack(inputs[start:start + batch]))
            if out.is_cuda:
                torch.cuda.synchronize()

        def pipeline() -> None:
            analysis = analyse_study(store, registry, study, explain_top=3)
            assert analysis is not None and len(analysis.event.findings) == args.n
            assert sum(f.heatmap_artifact_id is not None for f in analysis.event.findings) == 3

        paths_timed: dict[str, list[float]] = {"bare forward b32": [], "pipeline": []}
        if args.b1:
            paths_timed["bare forward b1"] = []
        cpu_timed: dict[str, list[float]] = {name: [] for name in paths_timed}

        def measure(name: str, fn: Callable[[], object]) -> None:
            wall, cpu = timed(fn)
            paths_timed[name].append(wall)
            cpu_timed[name].append(cpu)
        print(f"{op.model_name} (input {'x'.join(map(str, op.bundle.spatial_shape))}), device {op.bundle.device}, "
              f"{args.n} images 512x512, torch threads {torch.get_num_threads()}, {args.rounds} rounds")
        for round_no in range(args.rounds):
            measure("bare forward b32", lambda: bare(32))
            measure("pipeline", pipeline)
            if args.b1:
                measure("bare forward b1", lambda: bare(1))
            ratio = paths_timed["bare forward b32"][-1] / paths_timed["pipeline"][-1]
            print(f"  round {round_no + 1}: bare b32 {paths_timed['bare forward b32'][-1]:.2f} s, pipeline "
                  f"{paths_timed['pipeline'][-1]:.2f} s, pipeline throughput / bare b32 {ratio:.2f}", flush=True)
        base = statistics.median(paths_timed["bare forward b32"])
        base_cpu = statistics.median(cpu_timed["bare forward b32"])
        print(f"{'path (median of rounds)':<26} {'total s':>8} {'images/s':>9} {'throughput / bare b32':>22} "
              f"{'CPU s':>7} {'CPU / bare b32':>15}")
        for name, times in paths_timed.items():
            seconds, cpu = statistics.median(times), statistics.median(cpu_timed[name])
            print(f"{name:<26} {seconds:8.2f} {args.n / seconds:9.1f} {base / seconds:22.2f} {cpu:7.2f} "
                  f"{cpu / base_cpu:15.2f}")
        ratios = [b / p for b, p in zip(paths_timed["bare forward b32"], paths_timed["pipeline"], strict=True)]
        print(f"pipeline throughput / bare forward b32, per round: {', '.join(f'{r:.2f}' for r in ratios)}")

        cr = make_cr_study(store, folder)
        ct60, _ = make_ct_study(store, folder, 60)
        print(f"{'per-study latency':<26} {'p50 ms':>8} {'p95 ms':>8} {'CPU p50 ms':>11} {'runs':>5}")
        for name, event in (("CR, 1 image 1955x1841", cr), ("CT series, 60 slices", ct60)):
            runs = [timed(lambda event=event: analyse_study(store, registry, event, explain_top=3))
                    for _ in range(args.latency_runs)]
            walls, cpus = [wall * 1000 for wall, _ in runs], [cpu * 1000 for _, cpu in runs]
            print(f"{name:<26} {percentile(walls, 50):8.0f} {percentile(walls, 95):8.0f} "
                  f"{percentile(cpus, 50):11.0f} {len(runs):5d}")
        store.stop()


if __name__ == "__main__":
    main()
