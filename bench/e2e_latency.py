"""End-to-end latency: C-STORE of one CT instance to a stored, retrievable DiagnosticReport.

Compared in the same run against a baseline made of what the path cannot avoid:
  (a) the same `storescu` C-STORE into dcmtk's `storescp` (a native DICOM store), and
  (b) the bare CNN inference (BundleOperator.run_dataset) on the same image, in process.
The ratio MedBridge / (a + b) is the pipeline's overhead factor: storage, store, outbox,
Kafka hops, report writing and FHIR validation. Run: `make bench` or
`.venv/bin/python bench/e2e_latency.py --n 20`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_variants(folder: Path, n: int) -> list[tuple[Path, str]]:
    """n copies of CT_small.dcm, each its own study (new Study/Series/SOP Instance UIDs)."""
    out = []
    for i in range(n):
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"ct_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, ds.StudyInstanceUID))
    return out


def storescu(port: int, path: Path, aec: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aec", aec, "127.0.0.1", str(port), str(path)], check=True,
                   capture_output=True, env={**os.environ, "TCP_NODELAY": "1"})
    return time.perf_counter() - t0


def baseline_storescp(variants: list[tuple[Path, str]], workdir: Path) -> list[float]:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        return [storescu(port, p, "STORESCP") for p, _ in variants]
    finally:
        proc.terminate()
        proc.wait()


def baseline_inference(weights: Path, variants: list[tuple[Path, str]]) -> list[float]:
    from inference.imaging.bundle import load_bundle
    from inference.imaging.operator import BundleOperator

    detector = BundleOperator(load_bundle(weights, "cpu"))
    detector.run_dataset(dcmread(variants[0][0]))  # warm-up, as the worker is warm
    times = []
    for path, _ in variants:
        t0 = time.perf_counter()
        detector.run_dataset(dcmread(path))
        times.append(time.perf_counter() - t0)
    return times


async def medbridge_latencies(variants: list[tuple[Path, str]], workdir: Path, weights: Path) -> list[float]:
    from integration.app.runtime import Runtime
    from integration.app.settings import Settings
    from integration.auth.embedded import embedded_token

    settings = Settings(
        data_dir=workdir / "var", dicom_host="127.0.0.1", dicom_port=free_port(), http_port=free_port(),
        embedded_kafka_port=free_port(), kafka_bootstrap_servers="", viewer_enabled=False,
        imaging_model=weights, workers="imaging,reports", study_quiet_seconds=2.0, database_url="",
    )
    runtime = Runtime(settings)
    await runtime.start()
    latencies = []
    try:
        token = embedded_token(settings, ["integration"], "bench")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            for path, study_uid in variants:
                t0 = time.perf_counter()
                await asyncio.to_thread(storescu, settings.dicom_port, path, "MEDBRIDGE")
                while True:
                    b = (await client.get("/fhir/ImagingStudy",
                                          params={"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"})).json()
                    if b.get("entry"):
                        subject = b["entry"][0]["resource"]["subject"]["reference"]
                        reports = (await client.get("/fhir/DiagnosticReport", params={"subject": subject})).json()
                        if any(study_uid_matches(r["resource"], b["entry"][0]["resource"]["id"])
                               for r in reports.get("entry", [])):
                            break
                    if time.perf_counter() - t0 > 120:
                        raise RuntimeError("no report within 120 s")
                    await asyncio.sleep(0.01)
                latencies.append(time.perf_counter() - t0)
    finally:
        await runtime.stop()
    return latencies


def study_uid_matches(report: dict, imaging_study_id: str) -> bool:
    return any(ref["reference"] == f"ImagingStudy/{imaging_study_id}" for ref in report.get("imagingStudy", []))


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=15)
    parser.add_argument("--weights", type=Path, help="imaging weights (default: train a quick model)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="medbridge-bench-"))
    try:
        weights = args.weights
        if weights is None:
            from inference.imaging.train import train_demo_model

            weights = workdir / "demo-bundle"
            train_demo_model(weights, quick=True, log=lambda _m: None)
        variants = make_variants(workdir, args.n)
        store_times = baseline_storescp(variants, workdir)
        infer_times = baseline_inference(weights, variants)
        mb_times = asyncio.run(medbridge_latencies(variants, workdir, weights))
        base = statistics.median(store_times) + statistics.median(infer_times)
        result = {
            "n": args.n,
            "storescp_cstore": summary(store_times),
            "bare_inference": summary(infer_times),
            "medbridge_cstore_to_report": summary(mb_times),
            "baseline_ms": round(base * 1000, 1),
            "ratio_median": round(statistics.median(mb_times) / base, 2),
        }
        print(json.dumps(result, indent=2))
        print("\n| measure | median ms | p95 ms |\n|---|---|---|")
        for name in ("storescp_cstore", "bare_inference", "medbridge_cstore_to_report"):
            print(f"| {name} | {result[name]['median_ms']} | {result[name]['p95_ms']} |")
        print(f"\nratio MedBridge / (storescp + bare inference) = {result['ratio_median']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
