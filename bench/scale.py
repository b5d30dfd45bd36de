"""Scale-out: one fixed load of studies and FHIR records while 1, 2 and 4 worker processes run.

Real engines: PostgreSQL (a fresh database per round, from ``--postgres``), the embedded Kafka-protocol
broker, ChromaDB as a server (``chroma run``, the clinical workers' knowledge base) and real
``medbridge run`` processes with split roles: the bench process runs the edges and the report writer
(``MEDBRIDGE_WORKERS=reports``); each worker process runs the imaging and clinical workers in
workers-only mode (``MEDBRIDGE_EDGES=false``), one torch thread each, in the same consumer groups.

For each worker count: studies (and records) per second from the first send to the last report, p95
time from a study's last instance (a record's POST) to its report, the ratio of throughput to one
process, and where the CPU went (seconds of CPU used by the worker processes and by the edges, and the
share of the machine's cores that were busy over the run). On 2 cores the CPU-bound inference cannot
scale past 2 processes: the busy share then approaches 100 % and more processes only share it.

    .venv/bin/python bench/scale.py --studies 24 --records 8 --processes 1 2 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage  # noqa: E402
from sqlalchemy import select  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IMAGES_PER_STUDY = 3
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (and its waited-for children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def fresh_database(admin_url: str) -> str:
    import psycopg

    name = f"medbridge_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{admin_url.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://')}/{name}"


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def start_chroma(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    chroma = Path(sys.executable).parent / "chroma"
    proc = subprocess.Popen([str(chroma), "run", "--path", str(folder), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("chroma run did not answer in 60 s")


def worker_process(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "integration.app.cli", "run"], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=out)


def wait_up(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for proc, log in zip(procs, logs, strict=True):
        while "MedBridge workers up" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker process did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)


def send_studies(port: int, n: int) -> dict[str, float]:
    """``n`` studies of IMAGES_PER_STUDY images on one association; study UID -> monotonic time sent."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="SCALE_BENCH")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
    sent: dict[str, float] = {}
    try:
        for _ in range(n):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.PatientID = f"SCALE-{uuid.uuid4().hex[:8]}"
            for _ in range(IMAGES_PER_STUDY):
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                assert assoc.send_c_store(ds).Status == 0
            sent[str(ds.StudyInstanceUID)] = time.monotonic()
    finally:
        assoc.release()
    return sent


def send_records(api: str, token: str, n: int) -> dict[str, float]:
    """``n`` demo patient bundles; Patient reference -> monotonic time sent."""
    from integration.app.demo import demo_bundle

    sent: dict[str, float] = {}
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        for _ in range(n):
            r = client.post("/fhir", json=demo_bundle(), headers={"Content-Type": "application/fhir+json"})
            r.raise_for_status()
            ref = r.json()["entry"][0]["response"]["location"].split("/_history")[0]
            sent[ref] = time.monotonic()
    return sent


async def one_round(args: argparse.Namespace, processes: int, work: Path, weights: Path, llm: Path,
                    chroma_url: str) -> dict[str, float]:
    from integration.app.runtime import Runtime
    from integration.app.settings import Settings
    from integration.auth.embedded import embedded_token
    from integration.db.tables import AiResult

    database = fresh_database(args.postgres)
    data = work / f"var-{processes}"
    settings = Settings(data_dir=data, dicom_host="127.0.0.1", dicom_port=free_port(), http_port=free_port(),
                        embedded_kafka_port=free_port(), kafka_bootstrap_servers="", viewer_enabled=False,
                        workers="reports", database_url=database, study_quiet_seconds=0.5,
                        record_quiet_seconds=0.5, audit_enabled=False, outbox_poll_seconds=0.1)
    runtime = Runtime(settings)
    await runtime.start()
    roles = "imaging,clinical" if args.records else "imaging"  # no records: no knowledge base or LLM to load
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDBRIDGE_EDGES": "false", "MEDBRIDGE_WORKERS": roles,
           "MEDBRIDGE_DATA_DIR": str(data.resolve()), "DATABASE_URL": database,
           "KAFKA_BOOTSTRAP_SERVERS": runtime.bootstrap or "", "MEDBRIDGE_IMAGING_MODEL": str(weights),
           "MEDBRIDGE_LLM_MODEL": str(llm), "CHROMA_URL": chroma_url, "OMP_NUM_THREADS": "1",
           "MEDBRIDGE_LLM_MAX_NEW_TOKENS": "24"}
    logs = [work / f"worker-{processes}-{i}.log" for i in range(processes)]
    procs = [worker_process(env, log) for log in logs]
    try:
        await asyncio.to_thread(wait_up, procs, logs)
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in procs}
        edges0 = cpu_seconds(os.getpid())
        t0 = time.monotonic()
        token = embedded_token(settings, ["integration"], "scale-bench", "scale bench", 3600)
        api = f"http://127.0.0.1:{runtime.http_port}"
        studies, records = await asyncio.gather(
            asyncio.to_thread(send_studies, runtime.dicom.port, args.studies),  # type: ignore[union-attr]
            asyncio.to_thread(send_records, api, token, args.records),
        )
        done: dict[str, float] = {}
        deadline = time.monotonic() + args.timeout
        while len(done) < len(studies) + len(records):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(done)} of {len(studies) + len(records)} reports after {args.timeout} s")
            with runtime.store.session() as s:
                for kind, study, subject in s.execute(select(AiResult.kind, AiResult.study_instance_uid,
                                                             AiResult.subject_ref)):
                    key = study if kind == "imaging" else subject
                    if key is not None and key not in done and (key in studies or key in records):
                        done[key] = time.monotonic()
            await asyncio.sleep(0.1)
        wall = max(done.values()) - t0
        latencies = [done[k] - t for k, t in {**studies, **records}.items()]
        worker_cpu = sum(cpu_seconds(p.pid) - cpu0[p.pid] for p in procs)
        edges_cpu = cpu_seconds(os.getpid()) - edges0
        return {"wall": wall, "studies_per_s": len(studies) / wall, "items_per_s": len(done) / wall,
                "p95": statistics.quantiles(latencies, n=20)[-1], "worker_cpu": worker_cpu, "edges_cpu": edges_cpu,
                "busy": (worker_cpu + edges_cpu) / wall / len(os.sched_getaffinity(0))}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        await runtime.stop()
        drop_database(args.postgres, database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--postgres", default="postgresql://medbridge:medbridge@127.0.0.1:5432/postgres",
                        help="an account that may create databases (one per round)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--weights", type=Path, help="imaging weights to use (default: a quick demo training run)")
    args = parser.parse_args()
    from inference.imaging.train import train_demo_model
    from knowledge.ingest import ingest_default_corpus
    from knowledge.store import KnowledgeBase
    from knowledge.testing import build_tiny_random_llama

    work = Path(tempfile.mkdtemp(prefix="medbridge-scale-"))
    chroma: subprocess.Popen[bytes] | None = None
    llm, chroma_url = work / "no-llm", ""
    try:
        weights = args.weights or work / "demo.pt"
        if args.weights is None:
            train_demo_model(weights, quick=True, log=lambda _m: None)
        if args.records:
            llm = build_tiny_random_llama(work / "tiny-llama")
            chroma, chroma_url = start_chroma(work / "chroma")
            ingest_default_corpus(KnowledgeBase(work / "unused", chroma_url=chroma_url))
        results = {n: asyncio.run(one_round(args, n, work, weights, llm, chroma_url)) for n in args.processes}
        base = results[args.processes[0]]["items_per_s"]
        cores = len(os.sched_getaffinity(0))
        print(f"\n{args.studies} studies ({IMAGES_PER_STUDY} CT images each) + {args.records} FHIR records, "
              f"{cores} cores, PostgreSQL, embedded broker{', chroma run' if args.records else ''}; "
              f"worker processes run {'imaging + clinical' if args.records else 'imaging'}\n")
        print("| worker processes | studies/s | reports/s | ratio to 1 | p95 time to report (s) | "
              "worker CPU (s) | edges CPU (s) | cores busy |\n|---|---|---|---|---|---|---|---|")
        for n, r in results.items():
            print(f"| {n} | {r['studies_per_s']:.2f} | {r['items_per_s']:.2f} | {r['items_per_s'] / base:.2f} | "
                  f"{r['p95']:.1f} | {r['worker_cpu']:.1f} | {r['edges_cpu']:.1f} | {100 * r['busy']:.0f} % |")
    finally:
        if chroma is not None:
            chroma.terminate()
            chroma.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
