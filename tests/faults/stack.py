"""A MedBridge under test with its peers, and the run of one fault: traffic starts, the fault is
injected and lifted, the traffic ends, the suite waits for every item to be delivered and counts.

The durations come from ``Durations``: short ones in CI (``make test``), the full ones in
``bench/faults.py`` (which sets ``MEDBRIDGE_FAULTS_SCALE=bench``).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests import authorized
from tests.conftest import free_port
from tests.faults.audit import Counts, count, wait_until_delivered
from tests.faults.peers import FaultProxy, Orthanc, UpstreamFhir
from tests.faults.process import MedbridgeProcess
from tests.faults.traffic import Ledger, Plan, Traffic


@dataclass(frozen=True)
class Durations:
    """Seconds each outage lasts and how long the suite waits for delivery afterwards."""

    database_down: float
    upstream_down: float
    pacs_down: float
    disk_full: float
    barrage: float
    settle: float
    studies: int
    instances: int
    bundles: int

    @classmethod
    def from_environment(cls) -> Durations:
        if os.environ.get("MEDBRIDGE_FAULTS_SCALE") == "bench":
            return cls(database_down=30, upstream_down=300, pacs_down=120, disk_full=30, barrage=60,
                       settle=600, studies=12, instances=5, bundles=12)
        return cls(database_down=float(os.environ.get("MEDBRIDGE_FAULTS_DB_DOWN_S", 30)),
                   upstream_down=float(os.environ.get("MEDBRIDGE_FAULTS_UPSTREAM_DOWN_S", 20)),
                   pacs_down=20, disk_full=10, barrage=15, settle=60, studies=4, instances=3, bundles=5)


def quick_environment(tmp: Path, *, imaging_model: Path, llm_model: Path, database_url: str,
                      upstream_url: str, orthanc: Orthanc) -> dict[str, str]:
    """`medbridge run`'s environment: free ports, quick quiet periods and retries, tiny models."""
    peers = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port, "export": True}]
    return {
        "MEDBRIDGE_DATA_DIR": str(tmp / "var"),
        "MEDBRIDGE_DICOM_PORT": str(free_port()),
        "MEDBRIDGE_HTTP_PORT": str(free_port()),
        "MEDBRIDGE_EMBEDDED_KAFKA_PORT": str(free_port()),
        "KAFKA_BOOTSTRAP_SERVERS": "",
        "DATABASE_URL": database_url,
        "MEDBRIDGE_AUTH_SIGNING_KEY": str(authorized.issuer_key()),
        "MEDBRIDGE_VIEWER": "false",
        "MEDBRIDGE_FHIR_VALIDATION_WORKERS": "0",
        "MEDBRIDGE_IMAGING_MODEL": str(imaging_model),
        "MEDBRIDGE_LLM_MODEL": str(llm_model),
        "MEDBRIDGE_LLM_MAX_NEW_TOKENS": "16",
        "MEDBRIDGE_DEVICE": "cpu",
        # longer than a gap within one study's burst: each study is one revision unless a fault splits it
        "MEDBRIDGE_STUDY_QUIET_SECONDS": "2",
        "MEDBRIDGE_RECORD_QUIET_SECONDS": "1",
        "MEDBRIDGE_OUTBOX_POLL_SECONDS": "0.2",
        # the relay republishes what no consumer finished after this long (default 300 s)
        "MEDBRIDGE_REDELIVER_AFTER_SECONDS": "15",
        "MEDBRIDGE_MIN_FREE_BYTES": str(4 * 1024**2),
        "MEDBRIDGE_DICOM_PEERS": json.dumps(peers),
        "MEDBRIDGE_DICOM_ALLOW_ANY_CALLER": "true",  # the suite's modality is not a configured peer
        "MEDBRIDGE_DICOM_EXPORT_BACKOFF_SECONDS": "1",
        "MEDBRIDGE_DICOM_EXPORT_MAX_BACKOFF_SECONDS": "10",
        "MEDBRIDGE_DICOM_EXPORT_TIMEOUT_SECONDS": "10",
        "MEDBRIDGE_UPSTREAM_FHIR_URL": upstream_url,
        "MEDBRIDGE_UPSTREAM_BACKOFF_BASE_SECONDS": "0.5",
        "MEDBRIDGE_UPSTREAM_BACKOFF_MAX_SECONDS": "10",
        "MEDBRIDGE_UPSTREAM_POLL_SECONDS": "0.5",
        "MEDBRIDGE_UPSTREAM_TIMEOUT_SECONDS": "5",
        "OMP_NUM_THREADS": "1",  # two shared cores: no OpenMP oversubscription
    }


@dataclass
class FaultStack:
    """A running MedBridge and the peers the faults act on."""

    process: MedbridgeProcess
    upstream: UpstreamFhir
    proxy: FaultProxy
    orthanc: Orthanc
    folder: Path
    postgres: Any = None  # tests.faults.peers.PrivatePostgres when the store is on it

    def stop(self) -> None:
        self.process.stop()


@dataclass
class Result:
    fault: str
    counts: Counts
    seconds: float  # the whole run: traffic, fault, delivery, counting
    fault_seconds: float
    recovery_seconds: float | None  # fault end to the last item delivered; None: not all of it in time
    still_pending: list[str]
    peak_rss_mib: float
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return json.dumps({**asdict(self), "counts": {**asdict(self.counts)}}, indent=1, default=str)


def run_fault(name: str, stack: FaultStack, plan: Plan, inject: Callable[[], dict[str, Any] | None],
              durations: Durations, *, lead_s: float = 3.0, allowed_5xx: tuple[int, ...] = ()) -> Result:
    """Traffic, then ``inject()`` after ``lead_s`` (it returns when the fault is lifted, with notes),
    then delivery and the counts. The runtime's peak RSS is sampled every second meanwhile."""
    started = time.monotonic()
    ledger = Ledger()
    traffic = Traffic(plan, stack.process.http, stack.process.dicom_port, stack.folder / f"traffic-{name}", ledger)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(1.0):
            stack.process.track_tree()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    traffic.start()
    time.sleep(lead_s)
    fault_start = time.monotonic()
    notes = inject() or {}
    fault_end = time.monotonic()
    traffic.join()
    done_at, left = wait_until_delivered(ledger, traffic.studies, stack.process.http, stack.upstream,
                                         stack.orthanc, durations.settle)
    counts = count(ledger, traffic.studies, stack.process.http, stack.upstream, stack.orthanc,
                   allowed_5xx=allowed_5xx)
    sampling.set()
    sampler.join()
    # no patient data in logs: the runtime hashes identifiers (integration.phi.uid_hash)
    counts.log_lines_with_raw_uids = lines_naming(stack.process.log_path,
                                                  {i.sop for s in traffic.studies for i in s.instances}
                                                  | {s.uid for s in traffic.studies})
    stack.process.track_tree()
    result = Result(
        fault=name, counts=counts, seconds=round(time.monotonic() - started, 1),
        fault_seconds=round(fault_end - fault_start, 1),
        recovery_seconds=None if done_at is None else round(max(0.0, done_at - fault_end), 1),
        still_pending=left[:20], peak_rss_mib=round(stack.process.peak_rss / 1024**2, 1), notes=notes,
    )
    record(result)
    print(result.summary())  # in the test's captured output
    return result


def lines_naming(log: Path, identifiers: set[str]) -> int:
    """Lines of the runtime's log that carry one of ``identifiers`` in the clear (they should be hashed,
    integration.phi.uid_hash). Counted with the losses: the expected count is zero."""
    try:
        return sum(any(uid in line for uid in identifiers) for line in log.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def record(result: Result) -> None:
    """Appends the result to MEDBRIDGE_FAULTS_RESULTS (a JSON-lines file bench/faults.py reads), if set."""
    path = os.environ.get("MEDBRIDGE_FAULTS_RESULTS")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({**asdict(result), "counts": asdict(result.counts)}, default=str) + "\n")


def explain(result: Result, stack: FaultStack) -> str:
    """The failure message: the non-zero counts, what is still pending, and the runtime log's tail."""
    return (f"fault {result.fault}: non-zero counts {result.counts.nonzero()}; pending {result.still_pending}; "
            f"detail {result.counts.detail}; notes {result.notes}\n"
            f"--- runtime log ({stack.process.log_path}) ---\n{stack.process.tail(80)}")


def copy_chroma(seed: Path, data_dir: Path) -> None:
    shutil.copytree(seed, data_dir / "chroma")
