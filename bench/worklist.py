"""The reviewer's worklist at scale: N AI reports generated into the store (imaging and clinical, several
models, modalities, priorities; some studies with two revisions), then GET /api/worklist timed over HTTP
for the filtered pages a reviewer asks for, against the floor of GET /health on the same server.

    .venv/bin/python bench/worklist.py --reports 5000 --queries 60
    .venv/bin/python bench/worklist.py --database-url postgresql+psycopg://medbridge:medbridge@127.0.0.1:5432/<db>

Target: p95 under 100 ms for a filtered page (issue 17).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from integration.app.http import create_app  # noqa: E402
from integration.app.services import Services  # noqa: E402
from integration.app.settings import Settings  # noqa: E402
from integration.auth.embedded import embedded_token  # noqa: E402
from integration.auth.principal import ROLES  # noqa: E402
from integration.db.store import Store  # noqa: E402
from integration.db.tables import AiResult, DicomInstance  # noqa: E402
from integration.fhir.resources import AI_ASSERTED, store_resource, validate_resource  # noqa: E402
from integration.reports.index import index_report  # noqa: E402

MODELS = [("lesion-net", "1.2"), ("lesion-net", "1.3"), ("chest-cnn", "0.9")]
MODALITIES = ["CT", "CR", "MR", "DX"]
FINDINGS = ["synthetic_round_lesion", "effusion", "nodule"]
STATUSES = ["preliminary"] * 6 + ["final", "amended", "entered-in-error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def generate(store: Store, n: int, seed: int = 17) -> float:
    """N reports (about one in ten a second revision of a study), each with its worklist row; seconds."""
    rng = random.Random(seed)
    started = time.perf_counter()
    base = datetime.now(UTC) - timedelta(days=30)
    study = 0
    with store.session() as s:
        for i in range(n):
            if i == 0 or rng.random() > 0.1:
                study += 1
                modality = rng.choice(MODALITIES)
                s.add(DicomInstance(sop_instance_uid=f"2.25.{study}.1", study_instance_uid=f"2.25.{study}",
                                    series_instance_uid=f"2.25.{study}.9", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                    transfer_syntax_uid="1.2.840.10008.1.2.1", modality=modality,
                                    patient_id=f"PID{study % 900}", is_image=True, path="/dev/null", size=0))
            kind = "imaging" if rng.random() < 0.85 else "clinical"
            rid = f"bench-{i}"
            model, version = rng.choice(MODELS)
            issued = base + timedelta(seconds=rng.uniform(0, 30 * 86400))
            report = {"resourceType": "DiagnosticReport", "id": rid, "status": rng.choice(STATUSES),
                      "meta": {"security": [AI_ASSERTED]}, "code": {"text": "AI analysis"},
                      "subject": {"reference": f"Patient/p{study % 900}"},
                      "issued": issued.isoformat(timespec="seconds").replace("+00:00", "Z"),
                      "conclusion": "generated for the worklist benchmark"}
            store_resource(s, validate_resource(report), track=False)
            instances = [{"sop_instance_uid": f"2.25.{study}.{k}", "series_instance_uid": f"2.25.{study}.9",
                          "probabilities": {f: round(rng.random(), 3) for f in FINDINGS}} for k in range(3)]
            ai = AiResult(report_id=rid, kind=kind, source_event_id=f"e-{i}", subject_ref=f"Patient/p{study % 900}",
                          study_instance_uid=f"2.25.{study}" if kind == "imaging" else None,
                          details={"model_name": model, "model_version": version, "instances": instances})
            s.add(ai)
            s.flush()
            index_report(s, report, ai)
    return time.perf_counter() - started


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


QUERIES = [
    {"status": "preliminary", "sort": "probability"},
    {"status": "preliminary", "modality": "CT", "min_probability": "0.7"},
    {"status": "preliminary", "model": "lesion-net", "sort": "waiting"},
    {"kind": "imaging", "finding": "effusion", "sort": "priority"},
    {"status": "preliminary,final", "from": (datetime.now(UTC) - timedelta(days=7)).isoformat()},
    {"patient": "PID42"},
    {"status": "preliminary", "sort": "probability", "offset": "1000"},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=60, help="timed requests per query kind")
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-worklist-"))
    url = args.database_url or f"sqlite:///{tmp / 'store.db'}"
    store = Store(url)
    store.start()
    settings = Settings(data_dir=tmp, database_url=url, viewer_enabled=False, audit_enabled=True)  # type: ignore[call-arg]
    seconds = generate(store, args.reports)
    print(f"store: {store.engine.dialect.name}; {args.reports} reports generated in {seconds:.1f} s")
    # planner statistics and (PostgreSQL) the visibility map, as autovacuum leaves them after a bulk load
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "VACUUM ANALYZE" if store.engine.dialect.name == "postgresql" else "ANALYZE")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Services(settings, store)), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    token = embedded_token(settings, list(ROLES), "bench", ttl_seconds=3600)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as client:
        client.get("/api/worklist").raise_for_status()  # warm-up: imports, first connection
        floor = []
        for _ in range(args.queries):
            t = time.perf_counter()
            client.get("/health").raise_for_status()
            floor.append((time.perf_counter() - t) * 1000)
        everything: list[float] = []
        for params in QUERIES:
            times = []
            for _ in range(args.queries):
                t = time.perf_counter()
                page = client.get("/api/worklist", params=params).raise_for_status().json()
                times.append((time.perf_counter() - t) * 1000)
            everything += times
            print(f"  {params}: {page['total']} entries; p50 {statistics.median(times):.1f} ms, "
                  f"p95 {pct(times, 95):.1f} ms")
    print(f"floor GET /health: p50 {statistics.median(floor):.1f} ms, p95 {pct(floor, 95):.1f} ms")
    print(f"worklist, all filtered pages: p50 {statistics.median(everything):.1f} ms, "
          f"p95 {pct(everything, 95):.1f} ms (target p95 < 100 ms)")
    server.should_exit = True
    store.stop()


if __name__ == "__main__":
    main()
