"""DICOM ingest throughput: the same N instances on one association from dcmtk `storescu` into
(a) dcmtk `storescp`, (b) Orthanc (when installed), (c) a bare pynetdicom SCP (the ceiling of
any pynetdicom receiver), (d) MedBridge (durable storage, store record,
event publication through the outbox to Kafka), in one run. Reports images/s and ratios to storescp.
``--parallel K`` sends the same files over K associations at once (K storescu processes).
``--stack full`` measures MedBridge as `make run` starts it (imaging worker and report writer too, the
imaging worker in a process of its own) while the imaging worker infers another study of N images sent
just before, beside the edges alone (``MEDBRIDGE_WORKERS=reports``) and the full stack with inference
in the runtime's process (``MEDBRIDGE_INFERENCE_PROCESSES=false``, as before issue 19).

    .venv/bin/python bench/dicom_ingest.py --n 300
    .venv/bin/python bench/dicom_ingest.py --n 300 --parallel 2
    .venv/bin/python bench/dicom_ingest.py --n 300 --stack full
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def make_instances(folder: Path, n: int) -> list[Path]:
    """n instances of CT_small.dcm in one study and series, each with its own SOP Instance UID."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send_all(port: int, aec: str, shares: list[list[Path]]) -> float:
    """Seconds to send every file, each share on its own storescu association, all at once."""
    os.sync()  # what earlier receivers left dirty is not written back during this one's run
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", aec, "127.0.0.1", str(port), *map(str, share)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=NODELAY)
             for share in shares]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - t0
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu to {aec} failed: {err[-500:]}")
    return elapsed


def send_to_receiver(command: list[str], port: int, aec: str, shares: list[list[Path]]) -> float:
    """Start a third-party receiver, send every file to it once it listens, stop it."""
    proc = subprocess.Popen(command, env=NODELAY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send_all(port, aec, shares)
    finally:
        proc.terminate()
        proc.wait()


def bench_storescp(shares: list[list[Path]], work: Path) -> float:
    port, out = free_port(), work / "storescp"
    out.mkdir(parents=True)
    return send_to_receiver(["storescp", "-od", str(out), str(port)], port, "STORESCP", shares)


def bench_orthanc(shares: list[list[Path]], work: Path) -> float | None:
    binary = shutil.which("Orthanc")
    if binary is None:
        return None
    port, http = free_port(), free_port()
    config = work / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(work / "orthanc-db"), "IndexDirectory": str(work / "orthanc-db"),
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
    }))
    return send_to_receiver([binary, str(config)], port, "ORTHANC", shares)


def bench_bare_pynetdicom(shares: list[list[Path]], work: Path) -> float:
    """The ceiling of any pynetdicom SCP here: raw bytes written (no decode, no fsync, no store)."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    out = work / "bare"
    out.mkdir(parents=True)

    def nodelay(event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def store(event: evt.Event) -> int:
        (out / str(event.request.AffectedSOPInstanceUID)).write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE("BARE")
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_C_STORE, store)])
    try:
        return send_all(port, "BARE", shares)
    finally:
        server.shutdown()


async def bench_medbridge(shares: list[list[Path]], work: Path, processes: int = 1, *,
                          busy: list[Path] | None = None, weights: Path | None = None,
                          inference_processes: bool = True) -> float:
    """Seconds to send ``shares``; with ``busy`` (another study's files) the stack runs the imaging worker
    too, and ``busy`` is sent first so that the worker infers it during the measured send."""
    from integration.app.runtime import Runtime
    from integration.app.settings import Settings

    settings = Settings(data_dir=work / "var", dicom_host="127.0.0.1", dicom_port=free_port(), http_port=free_port(),
                        embedded_kafka_port=free_port(), kafka_bootstrap_servers="", viewer_enabled=False,
                        workers="reports" if busy is None else "imaging,reports", imaging_model=weights,
                        database_url="", dicom_processes=processes, study_quiet_seconds=0.5,
                        inference_processes=inference_processes)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        if busy is not None:
            await asyncio.to_thread(send_all, settings.dicom_port, "MEDBRIDGE", [busy])
            await until_inferring(runtime)
        return await asyncio.to_thread(send_all, settings.dicom_port, "MEDBRIDGE", shares)
    finally:
        await runtime.stop()


async def until_inferring(runtime: Any, timeout: float = 60) -> None:
    """Until the busy study is announced (its StudyReceived in the outbox) and a moment has passed for the
    imaging worker to take it: inference then runs beside the measured send."""
    from sqlalchemy import select

    from integration.db.tables import OutboxEntry
    from schemas.events import TOPIC_STUDY_RECEIVED

    deadline = time.monotonic() + timeout
    while True:
        with runtime.store.session() as s:
            if s.scalars(select(OutboxEntry.id).where(OutboxEntry.topic == TOPIC_STUDY_RECEIVED)).first():
                break
        if time.monotonic() > deadline:
            raise RuntimeError("the busy study was not announced")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=1, help="associations at once, each with n/parallel files")
    parser.add_argument("--dicom-processes", type=int, default=1,
                        help="MedBridge listener processes sharing the port (MEDBRIDGE_DICOM_PROCESSES)")
    parser.add_argument("--stack", choices=("edges", "full"), default="edges",
                        help="full: also the stack as `make run` starts it, with the imaging worker busy")
    parser.add_argument("--weights", type=Path, help="imaging weights for --stack full (default: a quick training run)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds; each round runs every receiver once, in turn, and the median round counts")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medbridge-ingest-"))
    try:
        files = make_instances(work, args.n)
        busy = weights = None
        if args.stack == "full":
            from inference.imaging.train import train_demo_model

            (work / "busy").mkdir()
            busy = make_instances(work / "busy", args.n)  # another study, inferred during the measured send
            weights = args.weights or work / "demo.pt"
            if args.weights is None:
                train_demo_model(weights, quick=True, log=lambda _m: None)
        shares = [files[i :: args.parallel] for i in range(args.parallel)]
        seconds: dict[str, list[float]] = {}
        for round_ in range(args.repeat):
            # interleaved rounds, each receiver in a fresh folder: a noisy neighbour hits all of them alike
            here = work / f"round{round_}"
            seconds.setdefault("storescp", []).append(bench_storescp(shares, here))
            orthanc = bench_orthanc(shares, here)
            if orthanc is not None:
                seconds.setdefault("orthanc", []).append(orthanc)
            seconds.setdefault("bare pynetdicom SCP", []).append(bench_bare_pynetdicom(shares, here))
            label = "medbridge" if args.dicom_processes == 1 else f"medbridge ({args.dicom_processes} processes)"
            seconds.setdefault(label, []).append(asyncio.run(bench_medbridge(shares, here, args.dicom_processes)))
            if busy is not None:
                for name, own_process in (("medbridge full stack, imaging busy", True),
                                          ("medbridge full stack, imaging busy, inference in-process", False)):
                    seconds.setdefault(name, []).append(asyncio.run(bench_medbridge(
                        shares, here / name.rsplit(" ", 1)[-1], args.dicom_processes, busy=busy, weights=weights,
                        inference_processes=own_process)))
        base = args.n / statistics.median(seconds["storescp"])
        print(f"\n{args.n} instances of CT_small.dcm (39 KB) on {args.parallel} association(s), "
              f"storescu with TCP_NODELAY, median of {args.repeat} interleaved rounds\n")
        print("| receiver | images/s (median) | rounds | ratio to storescp | per-round ratio: median (range) |\n"
              "|---|---|---|---|---|")
        for name, runs in seconds.items():
            rate = args.n / statistics.median(runs)
            rounds = ", ".join(f"{args.n / t:.0f}" for t in runs)
            # each round's ratio against storescp in the same round: what a noisy neighbour moves least
            paired = [base_t / t for base_t, t in zip(seconds["storescp"], runs, strict=True)]
            print(f"| {name} | {rate:.0f} | {rounds} | {rate / base:.2f} | "
                  f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f}) |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
