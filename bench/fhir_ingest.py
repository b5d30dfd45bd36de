"""FHIR ingest and search: carebundle transaction Bundles (US Core R4, generated offline) posted over
HTTP to the MedBridge app served by uvicorn, against the bare cost of validating the same resources
with fhir.resources (R4B models) in the same run. Then the store is filled to --fill resources
(direct store inserts through the same indexing code, not HTTP) and read and search latencies are
measured over HTTP.

    .venv/bin/python bench/fhir_ingest.py --bundles 40 --fill 100000
    .venv/bin/python bench/fhir_ingest.py --database-url postgresql+psycopg://... (PostgreSQL)

Targets (FHIR edge issue): ingest at no more than 2x the bare validation cost per resource; search
p95 under 20 ms at 100,000 stored resources.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import carebundle  # noqa: E402
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fhir.resources.R4B import get_fhir_model_class  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from integration.app.http import create_app  # noqa: E402
from integration.app.services import Services  # noqa: E402
from integration.app.settings import Settings  # noqa: E402
from integration.auth.embedded import embedded_token  # noqa: E402
from integration.auth.principal import ROLES  # noqa: E402
from integration.db.store import Store  # noqa: E402
from integration.db.tables import FhirResource, FhirSearchIndex
from integration.fhir.resources import store_resources  # noqa: E402
from integration.fhir.validation import ValidationWorkers  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundles(n: int) -> list[dict[str, Any]]:
    profiles = sorted(carebundle.PROFILES)
    return [
        json.loads(carebundle.to_json(carebundle.generate_bundle(
            profile=profiles[i % len(profiles)], seed=1000 + i, sex="F" if i % 2 else "M", index=i)))
        for i in range(n)
    ]


def bare_validation_seconds(bundles: list[dict[str, Any]]) -> float:
    """One pass: fhir.resources model_validate of every entry's resource."""
    t0 = time.perf_counter()
    for b in bundles:
        for e in b["entry"]:
            get_fhir_model_class(e["resource"]["resourceType"]).model_validate(e["resource"])
    return time.perf_counter() - t0


def relabel(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The bundle's resources with fresh ids and urn:uuid references rewritten to Type/id."""
    mapping = {e["fullUrl"]: f"{e['resource']['resourceType']}/{uuid.uuid4()}" for e in bundle["entry"]}
    text = json.dumps([e["resource"] for e in bundle["entry"]])
    for urn, ref in mapping.items():
        text = text.replace(f'"{urn}"', f'"{ref}"')
    resources = json.loads(text)
    copy_tag = uuid.uuid4().hex[:8]
    for r, e in zip(resources, bundle["entry"], strict=True):
        r["id"] = mapping[e["fullUrl"]].split("/", 1)[1]
        for ident in r.get("identifier") or []:  # a copied patient is another patient: its own MRN
            if isinstance(ident.get("value"), str):
                ident["value"] = f"{ident['value']}-{copy_tag}"
    return resources


def fill(store: Store, templates: list[dict[str, Any]], target: int, have: int) -> tuple[int, float]:
    """Insert copies of the template bundles (fresh ids) until ``target`` resources are stored."""
    t0 = time.perf_counter()
    count = have
    i = 0
    while count < target:
        resources = relabel(templates[i % len(templates)])[: target - count]
        with store.session() as s:
            store_resources(s, resources)
        count += len(resources)
        i += 1
    return count - have, time.perf_counter() - t0


def stage_breakdown(store: Store, bundles: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per stage of the transaction path, run in-process on fresh copies of the bundles (the HTTP
    server runs in another thread, out of a profiler's sight): JSON parsing, preparation (validation,
    reference resolution and checks), the writes, the request's AuditEvent (built and written in the same
    transaction, as the API does), the commit."""
    from integration.audit.events import FHIR_TRANSACTION, Entity, Record
    from integration.audit.trail import record_in
    from integration.fhir.bundles import prepare_entries, write_entries
    from integration.identity import Actor

    stages = {"json": 0.0, "validate (model_validate)": 0.0, "prepare (refs, bindings, checks)": 0.0,
              "write (SQL)": 0.0, "audit (one AuditEvent a Bundle)": 0.0, "commit": 0.0}
    actor = Actor(sub="bench", name="bench", address="127.0.0.1", client_id="bench")
    for bundle in bundles:
        body = json.dumps(bundle).encode()
        t = time.perf_counter()
        data = json.loads(body)
        stages["json"] += time.perf_counter() - t
        t = time.perf_counter()
        for e in data["entry"]:
            get_fhir_model_class(e["resource"]["resourceType"]).model_validate(e["resource"])
        stages["validate (model_validate)"] += time.perf_counter() - t  # prepare validates again: subtracted below
        with store.session() as s:
            t = time.perf_counter()
            prepared = prepare_entries(s, data["entry"])
            stages["prepare (refs, bindings, checks)"] += time.perf_counter() - t
            t = time.perf_counter()
            write_entries(s, prepared)
            s.flush()
            stages["write (SQL)"] += time.perf_counter() - t
            t = time.perf_counter()
            record_in(s, Record(actor, FHIR_TRANSACTION, [Entity(None, "2", "4", description="bench")]))
            s.flush()
            stages["audit (one AuditEvent a Bundle)"] += time.perf_counter() - t
            t = time.perf_counter()
        stages["commit"] += time.perf_counter() - t
    stages["prepare (refs, bindings, checks)"] -= stages["validate (model_validate)"]
    return stages


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


AUTH_HEADERS: dict[str, str] = {}  # set by main once the app is up


def timed(client: httpx.Client, url: str, params: Any = None) -> float:
    t0 = time.perf_counter()
    r = client.get(url, params=params)
    elapsed = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{url} {params}: {r.status_code} {r.text[:300]}")
    return elapsed


def post_all(client: httpx.Client, base: str, bodies: list[bytes], latencies: list[float]) -> float:
    """Post the bodies one after another; seconds for all of them."""
    t0 = time.perf_counter()
    for body in bodies:
        t = time.perf_counter()
        r = client.post(base, content=body)
        latencies.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"transaction refused: {r.status_code} {r.text[:500]}")
    return time.perf_counter() - t0


def ingest_phase(store: Store, services: Services, base: str, bundles: list[dict[str, Any]], profile: bool,
                 rounds: int, audit_compare: bool = False) -> None:
    """Post the bundles over HTTP, in rounds interleaved with bare validation passes over the same
    resources (rotating which goes first), so that all see the same moments of a noisy machine; then
    break the time down by stage. Each round posts twice: with the validation workers the settings give
    (the default) and with the request thread validating alone (the cost on one core). Each round posts
    the same bodies again: their entries are POSTs with urn:uuid fullUrls, so each creates new resources."""
    n_resources = sum(len(b["entry"]) for b in bundles)
    bodies = [json.dumps(b).encode() for b in bundles]
    workers = services.fhir_validation
    latencies: list[float] = []
    rows = []
    with httpx.Client(timeout=120, headers={"Content-Type": "application/fhir+json", **AUTH_HEADERS}) as client:
        client.post(base, content=bodies[0])  # warm-up (not counted): imports, first connections, workers
        deadline = time.monotonic() + 60
        while workers is not None and workers.ready() < workers.count and time.monotonic() < deadline:
            time.sleep(0.1)
        for body in bodies[:workers.count + 1 if workers else 1]:
            client.post(base, content=body)  # each worker builds its model classes
        bare_validation_seconds(bundles[:1])

        def alone() -> float:
            services.fhir_validation = None
            try:
                return post_all(client, base, bodies, [])
            finally:
                services.fhir_validation = workers

        def unaudited() -> float:
            # the same posts with MEDBRIDGE_AUDIT=false: what the AuditEvent of each transaction costs
            services.settings.audit_enabled = False
            try:
                return post_all(client, base, bodies, [])
            finally:
                services.settings.audit_enabled = True

        passes = [("bare", lambda: bare_validation_seconds(bundles)),
                  ("pooled", lambda: post_all(client, base, bodies, latencies)), ("alone", alone)]
        if audit_compare:
            passes.append(("unaudited", unaudited))
        for i in range(rounds):
            order = passes[i % len(passes):] + passes[:i % len(passes)]
            seconds = {name: run() for name, run in order}
            rows.append({k: v / n_resources * 1e6 for k, v in seconds.items()})
    count = workers.count if workers else 0
    print(f"\ningest: {len(bundles)} transaction bundles, {n_resources} resources, {rounds} rounds; "
          f"{count} validation worker(s) (MEDBRIDGE_FHIR_VALIDATION_WORKERS) beside the request thread")
    print("  round   bare validation   MedBridge   ratio   request thread alone   ratio  (us/resource)")
    for i, r in enumerate(rows, 1):
        print(f"  {i:5d}   {r['bare']:15.0f}   {r['pooled']:9.0f}   {r['pooled'] / r['bare']:4.2f}x"
              f"   {r['alone']:20.0f}   {r['alone'] / r['bare']:4.2f}x")
    per_val = statistics.median(r["bare"] for r in rows)
    per_ingest = statistics.median(r["pooled"] for r in rows)
    print(f"  median: bare {per_val:.0f} us/resource; MedBridge {per_ingest:.0f} us/resource = "
          f"{1e6 / per_ingest:.0f} resources/s (bundle p50 {pct(latencies, 50):.0f} ms, "
          f"p95 {pct(latencies, 95):.0f} ms)")
    for key, label in (("pooled", f"with {count} worker(s)"), ("alone", "request thread alone")):
        ratios = [r[key] / r["bare"] for r in rows]
        print(f"  ratio {label}: {statistics.median(ratios):.2f}x median of the rounds' ratios "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}; target <= 2x)")
    if audit_compare:
        print("  audit on/off (MEDBRIDGE_AUDIT), same pooled posts, us/resource:")
        for i, r in enumerate(rows, 1):
            print(f"  {i:5d}   audit on {r['pooled']:7.0f}   audit off {r['unaudited']:7.0f}   "
                  f"on/off {r['pooled'] / r['unaudited']:4.3f}x")
        costs = [r["pooled"] / r["unaudited"] for r in rows]
        print(f"  audit on/off: {statistics.median(costs):.3f}x median of the rounds' ratios "
              f"(range {min(costs):.3f}-{max(costs):.3f}; target <= 1.10x)")
    stages = stage_breakdown(store, bundles)
    total_stages = sum(stages.values())
    print("  where the time goes (same bundles again, in-process, us/resource):")
    for name, seconds in stages.items():
        print(f"    {name:36s} {seconds / n_resources * 1e6:7.0f}")
    print(f"    {'in-process total':36s} {total_stages / n_resources * 1e6:7.0f}  (over HTTP above: "
          f"{per_ingest:.0f}; the difference is HTTP, routing and the response, give or take the noise)")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        stage_breakdown(store, bundles)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=int, default=40, help="carebundle transaction bundles to post")
    ap.add_argument("--fill", type=int, default=100_000, help="stored resources for the read/search phase")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved ingest/bare-validation rounds")
    ap.add_argument("--queries", type=int, default=200, help="requests per read/search kind")
    ap.add_argument("--database-url", default="", help="default: SQLite in a temporary folder")
    ap.add_argument("--profile", action="store_true", help="also cProfile the in-process transaction path")
    ap.add_argument("--audit-compare", action="store_true",
                    help="also post each round with the audit trail off (MEDBRIDGE_AUDIT=false) and compare")
    ap.add_argument("--skip-ingest", action="store_true",
                    help="only fill (if needed) and measure read/search, e.g. again on a --database-url already filled")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fhir-bench-"))
    url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
    store = Store(url)
    store.start()
    settings = Settings(data_dir=tmp, database_url=url, viewer_enabled=False)  # type: ignore[call-arg]
    port = free_port()
    services = Services(settings, store, fhir_validation=ValidationWorkers(settings.fhir_validation_workers))
    server = uvicorn.Server(uvicorn.Config(create_app(services), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}/fhir"
    # every route needs a token: one from the embedded issuer (the app made its key under the data dir)
    AUTH_HEADERS["Authorization"] = f"Bearer {embedded_token(settings, list(ROLES), 'bench', ttl_seconds=86400)}"
    print(f"store: {store.engine.dialect.name}; generating {args.bundles} carebundle transaction bundles ...")
    bundles = make_bundles(args.bundles)
    if not args.skip_ingest:
        ingest_phase(store, services, base, bundles, args.profile, args.rounds, args.audit_compare)
    with store.session() as s:
        have = s.scalar(select(func.count()).select_from(FhirResource)) or 0  # the warm-up bundle counts too
    added, fill_s = fill(store, bundles, args.fill, have)
    print(f"\nfill: {added} resources by direct store inserts in {fill_s:.1f} s ({added / max(fill_s, 1e-9):.0f}/s)"
          f"; {have + added} stored")
    if store.engine.dialect.name == "postgresql":
        # what autovacuum does after this many inserts (and did, in the middle of the measurements): the
        # visibility map for index-only scans, and planner statistics
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
    else:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")  # planner statistics, as a DBA would have them

    with store.session() as s:

        def sample(rtype: str, k: int) -> list[str]:
            return list(s.scalars(select(FhirResource.id).where(FhirResource.resource_type == rtype).limit(k * 50)))

        patients = random.Random(7).sample(sample("Patient", args.queries), args.queries)
        observations = random.Random(8).sample(sample("Observation", args.queries), args.queries)
        codes = [c for c in s.scalars(select(FhirSearchIndex.value).where(
            FhirSearchIndex.resource_type == "Observation", FhirSearchIndex.param == "code").distinct().limit(50))]
        idents = list(s.execute(select(FhirSearchIndex.system, FhirSearchIndex.value).where(
            FhirSearchIndex.resource_type == "Patient", FhirSearchIndex.param == "identifier").limit(args.queries)))
    rng = random.Random(9)
    kinds: dict[str, Any] = {
        "floor: GET /health (HTTP + one SELECT 1)": lambda i: (f"http://127.0.0.1:{port}/health", None),
        "read Observation/{id}": lambda i: (f"{base}/Observation/{observations[i]}", None),
        "Observation?patient": lambda i: (f"{base}/Observation", {"patient": f"Patient/{patients[i]}"}),
        "Observation?patient&code&date=ge": lambda i: (f"{base}/Observation", {
            "patient": f"Patient/{patients[i]}", "code": rng.choice(codes), "date": "ge2020-01-01"}),
        "Observation?code (_count=20)": lambda i: (f"{base}/Observation", {"code": rng.choice(codes), "_count": 20}),
        "Condition?patient": lambda i: (f"{base}/Condition", {"patient": patients[i]}),
        "Patient?identifier": lambda i: (f"{base}/Patient", {"identifier": "|".join(idents[i % len(idents)])}),
        "DiagnosticReport?patient&_include": lambda i: (f"{base}/DiagnosticReport", [
            ("patient", f"Patient/{patients[i]}"), ("_include", "DiagnosticReport:result")]),
        "Encounter?patient&date=ge&_sort=-date": lambda i: (f"{base}/Encounter", {
            "patient": f"Patient/{patients[i]}", "date": "ge2015", "_sort": "-date"}),
    }
    print(f"\nread and search over HTTP at {have + added} resources ({args.queries} requests each):")
    print(f"  {'request':44s} {'p50 ms':>7s} {'p95 ms':>7s}")
    all_search: list[float] = []
    with httpx.Client(timeout=60, headers=AUTH_HEADERS) as client:
        for name, make in kinds.items():
            for i in range(5):
                timed(client, *make(i))  # warm-up
            times = [timed(client, *make(i)) for i in range(args.queries)]
            if not name.startswith(("read", "floor")):
                all_search += times
            print(f"  {name:44s} {pct(times, 50):7.1f} {pct(times, 95):7.1f}")
    print(f"  {'all searches':44s} {pct(all_search, 50):7.1f} {pct(all_search, 95):7.1f}  (target p95 < 20 ms)")
    server.should_exit = True
    thread.join(10)
    if services.fhir_validation is not None:
        services.fhir_validation.stop()
    store.stop()


if __name__ == "__main__":
    main()
