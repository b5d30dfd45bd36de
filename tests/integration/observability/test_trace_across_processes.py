"""One study's trace across four `medbridge run` processes with split roles, a real broker and PostgreSQL:
the edge (the C-STORE association, the announcement), the imaging worker, the report writer and the
DICOM exporter, each writing its spans to a file of its own (MEDBRIDGE_TRACE_FILE) and its log as JSON
lines (MEDBRIDGE_LOG_FORMAT=json). A dcmtk storescp is the PACS the AI result is exported to."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from schemas.events import IMAGING_WORKER, TOPIC_IMAGING_COMPLETED, TOPIC_STUDY_RECEIVED
from tests import authorized
from tests.conftest import free_port
from tests.faults.process import MedbridgeProcess

CT_SMALL = get_testdata_file("CT_small.dcm")

# role -> what `medbridge run` runs in that process
ROLES = {
    "edge": {"MEDBRIDGE_DICOM": "true", "MEDBRIDGE_WORKERS": ""},
    "imaging": {"MEDBRIDGE_EDGES": "false", "MEDBRIDGE_WORKERS": "imaging"},  # workers only: no HTTP, no relay
    "reports": {"MEDBRIDGE_DICOM": "false", "MEDBRIDGE_WORKERS": "reports"},
    "export": {"MEDBRIDGE_DICOM": "false", "MEDBRIDGE_WORKERS": "dicom-export"},
}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[int]:
    """dcmtk storescp as the export peer PACS; its port."""
    port, folder = free_port(), tmp_path / "pacs"
    folder.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while subprocess.run(["echoscu", "-aec", "PACS", "127.0.0.1", str(port)], capture_output=True).returncode:
        assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path, kafka: str, postgres_url: str, imaging_weights: Path,
            pacs: int) -> Iterator[dict[str, MedbridgeProcess]]:
    shared = {
        "MEDBRIDGE_DATA_DIR": str(tmp_path / "var"), "DATABASE_URL": postgres_url, "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "MEDBRIDGE_VIEWER": "false", "MEDBRIDGE_STUDY_QUIET_SECONDS": "1", "MEDBRIDGE_FHIR_VALIDATION_WORKERS": "0",
        "MEDBRIDGE_IMAGING_MODEL": str(imaging_weights), "MEDBRIDGE_AUTH_SIGNING_KEY": str(authorized.issuer_key()),
        "MEDBRIDGE_DICOM_PEERS": json.dumps([{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs, "export": True}]),
        "MEDBRIDGE_DICOM_ALLOW_ANY_CALLER": "true", "MEDBRIDGE_LOG_FORMAT": "json",
        "MEDBRIDGE_DICOM_PORT": str(free_port()),
    }
    processes = {
        role: MedbridgeProcess({**shared, **env, "MEDBRIDGE_HTTP_PORT": str(free_port()),
                                "MEDBRIDGE_TRACE_FILE": str(tmp_path / f"spans-{role}.jsonl")},
                               tmp_path / f"{role}.log")
        for role, env in ROLES.items()
    }
    try:
        # the edge first: it migrates the database the others then find at head; they start side by side
        processes["edge"].start()
        workers = [threading.Thread(target=processes[role].start) for role in ("imaging", "reports", "export")]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        for role, process in processes.items():
            assert process.proc is not None and process.proc.poll() is None, f"{role} did not start:\n{process.tail()}"
        yield processes
    finally:
        for process in processes.values():
            if process.proc is not None:
                process.stop()


def spans(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for path in tmp_path.glob("spans-*.jsonl") for line in path.read_text().splitlines()]


def test_one_study_is_one_trace_across_four_processes(cluster: dict[str, MedbridgeProcess], tmp_path: Path) -> None:
    sent = subprocess.run(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(cluster["edge"].dicom_port), CT_SMALL],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 180
    while not any(s["name"] == "deliver pacs" for s in spans(tmp_path)):
        assert time.monotonic() < deadline, "no PACS delivery span:\n" + "\n".join(
            f"--- {role}\n{p.tail(15)}" for role, p in cluster.items())
        time.sleep(0.5)

    every = spans(tmp_path)
    (delivery,) = [s for s in every if s["name"] == "deliver pacs"]
    trace = [s for s in every if s["trace_id"] == delivery["trace_id"]]
    names = {s["name"] for s in trace}
    assert {"DICOM storage association", "announce study", f"send {TOPIC_STUDY_RECEIVED}",
            f"process {TOPIC_STUDY_RECEIVED}", f"send {TOPIC_IMAGING_COMPLETED}",
            f"process {TOPIC_IMAGING_COMPLETED}", "deliver pacs"} <= names, names
    # every process runs a study publisher; the one that claimed the revision announced it, once
    assert [s["name"] for s in trace].count("announce study") == 1
    pids = {role: process.pid for role, process in cluster.items()}
    by_pid = {s["pid"] for s in trace}
    assert set(pids.values()) <= by_pid, (pids, by_pid)  # every one of the four processes
    # one tree: every span but the association's has its parent in the trace
    ids = {s["span_id"] for s in trace}
    roots = [s["name"] for s in trace if s["parent_id"] not in ids]
    assert roots == ["DICOM storage association"], roots
    # the consumer span carries the messaging conventions, and no study UID anywhere
    (processed,) = [s for s in trace if s["name"] == f"process {TOPIC_STUDY_RECEIVED}"]
    assert processed["kind"] == "CONSUMER" and processed["attributes"]["messaging.system"] == "kafka"
    assert processed["attributes"]["messaging.consumer.group.name"].endswith(IMAGING_WORKER)
    study_uid = str(dcmread(CT_SMALL, stop_before_pixels=True).StudyInstanceUID)
    assert study_uid not in json.dumps(every)

    # the JSON log lines carry the trace of what they tell (any process's publisher may announce the study)
    lines = [json.loads(line) for process in cluster.values()
             for line in process.log_path.read_text().splitlines() if line.startswith("{")]
    assert lines and {"time", "level", "logger", "message", "trace_id", "span_id"} <= set(lines[0])
    announced = [line for line in lines if "announced" in line["message"]]
    assert announced and announced[0]["trace_id"] == delivery["trace_id"]
    assert all(study_uid not in line["message"] for line in lines)
