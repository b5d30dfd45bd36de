"""The fault suite at full length (issue 16): each fault of tests/faults injected into `medbridge run`
with more traffic and the long outages (upstream EHR down 5 minutes, PostgreSQL 30 s, the PACS 2
minutes, a 60 s barrage on the DICOM port), then a table of the counts for BENCHMARKS.md.

Every count is "acknowledged but lost" or "delivered zero times or twice": all are expected to be 0.
Recovery is the time from the end of the fault to the last item delivered (report written, sent
upstream, exported to the PACS). Run: `.venv/bin/python bench/faults.py [-k pattern] [--ci]`
(``--ci`` runs the short CI variants instead). It needs root for the full-disk fault (a tmpfs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

COLUMNS = [
    ("instances_missing", "inst. lost"), ("resources_missing", "FHIR lost"),
    ("studies_without_one_report", "studies ≠1 report"), ("records_without_one_report", "records ≠1 report"),
    ("reviews_missing", "reviews lost"), ("upstream_missing", "EHR 0×"), ("upstream_twice", "EHR 2×"),
    ("pacs_missing", "PACS 0×"), ("pacs_extra", "PACS 2×"), ("server_errors", "5xx"),
    ("log_lines_with_raw_uids", "UIDs in log"),
]


def table(rows: list[dict]) -> str:
    head = ["fault", "fault s", "acked inst/res/rev"] + [c[1] for c in COLUMNS]
    head += ["DICOM refusals", "recovery s", "peak RSS MiB", "run s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acked = r["counts"]["detail"].get("acknowledged", {})
        notes = {k: v for k, v in r["notes"].items() if v and k not in ("orphan_commands",)}
        cells = [r["fault"], str(r["fault_seconds"]),
                 f"{acked.get('instances', 0)}/{acked.get('resources', 0)}/{acked.get('reviews', 0)}"]
        cells += [str(r["counts"][key]) for key, _ in COLUMNS]
        refusals = r["counts"]["detail"].get("dicom_refusals", {})
        cells += [", ".join(f"{n}× {why}" for why, n in refusals.items()) or "0",
                  "not all" if r["recovery_seconds"] is None else str(r["recovery_seconds"]),
                  str(r["peak_rss_mib"]), str(r["seconds"]), json.dumps(notes)[:160].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-k", default="", help="pytest -k expression: which faults")
    parser.add_argument("--ci", action="store_true", help="the short CI durations instead of the full ones")
    parser.add_argument("--results", help="JSON-lines file to write (default: a temp file)")
    args = parser.parse_args()
    results = Path(args.results or tempfile.mkstemp(prefix="faults-", suffix=".jsonl")[1])
    results.write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDBRIDGE_FAULTS_RESULTS": str(results)}
    if not args.ci:
        env["MEDBRIDGE_FAULTS_SCALE"] = "bench"
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "faults"), "-m", "faults", "-q", "-p", "no:warnings",
           "-o", "timeout=3600"]
    if args.k:
        cmd += ["-k", args.k]
    started = time.monotonic()
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    print(f"\n{len(rows)} fault runs in {time.monotonic() - started:.0f} s (pytest exit {code}); "
          f"results in {results}\n")
    print(table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
