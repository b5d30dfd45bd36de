"""The traffic a fault is injected into, and the ledger of what MedBridge acknowledged.

- DICOM: each study over its own pynetdicom association, ``parallel`` studies at once, waves of them
  spread over the traffic's span; a study's instances go back to back (as a modality sends a study);
  an instance that is refused or cut off is sent again (as a modality does) until it is acknowledged or
  the traffic's deadline passes; a 0xCxxx "cannot understand" is not sent again. Studies are pydicom's
  CT_small with new UIDs.
- FHIR: transaction Bundles (a patient, a condition, two observations) with an integration token; a
  2xx answer acknowledges every resource in it.
- Reviews: a reviewer's token marks preliminary AI reports final, with If-Match.
Only acknowledged items are counted at the end: what MedBridge said yes to must be there.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from integration.app.demo import demo_bundle
from tests import authorized

CT_SMALL = get_testdata_file("CT_small.dcm")
ACCEPTED = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the warnings (the instance is kept)


@dataclass(frozen=True)
class Instance:
    path: Path
    study: str
    series: str
    sop: str


@dataclass
class Study:
    uid: str
    instances: list[Instance]
    hostile: bool = False


def make_study(folder: Path, n_instances: int, hostile: bool = False) -> Study:
    """``n_instances`` copies of CT_small in one new study and series. A hostile study has UIDs that
    DICOM's UID grammar forbids but the ingest accepts (``1.2.3_abc``), as in issue 16."""
    tag = random.getrandbits(40)
    study = f"1.2.3.{tag}_abc" if hostile else generate_uid()
    series = f"1.2.3.{tag}.1_abc" if hostile else generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    instances = []
    for i in range(n_instances):
        ds = dcmread(CT_SMALL)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"{len(list(folder.iterdir()))}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(Instance(path, study, series, str(ds.SOPInstanceUID)))
    return Study(study, instances, hostile)


@dataclass
class Ledger:
    """What MedBridge acknowledged, and every answer that was not a yes."""

    instances: dict[str, Instance] = field(default_factory=dict)  # SOP Instance UID -> instance
    resources: list[str] = field(default_factory=list)  # "Type/id" of every resource in a 2xx transaction
    patients: list[str] = field(default_factory=list)  # "Patient/id" of each acknowledged bundle
    reviews: dict[str, str] = field(default_factory=dict)  # report id -> the action acknowledged
    dicom_refusals: Counter[str] = field(default_factory=Counter)  # why a good instance was not acknowledged
    http_statuses: Counter[int] = field(default_factory=Counter)  # every HTTP status the traffic got
    http_unreachable: int = 0
    last_ack: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acknowledged(self, instance: Instance) -> None:
        with self.lock:
            self.instances[instance.sop] = instance
            self.last_ack = time.monotonic()

    def refused(self, reason: str) -> None:
        with self.lock:
            self.dicom_refusals[reason] += 1

    def answered(self, status: int) -> None:
        with self.lock:
            self.http_statuses[status] += 1

    def unreachable(self) -> None:
        with self.lock:
            self.http_unreachable += 1

    def server_errors(self, *excluding: int) -> int:
        return sum(n for status, n in self.http_statuses.items() if status >= 500 and status not in excluding)


@dataclass
class Plan:
    """How much traffic, how fast; ``deadline_s`` bounds the resending of refused instances."""

    studies: int = 3
    instances: int = 3
    hostile_studies: int = 0
    bundles: int = 5
    reviews: int = 2
    parallel: int = 2  # studies sent at the same time, each over its own association
    span_s: float = 10.0  # the studies' waves and the bundles are spread over this many seconds
    deadline_s: float = 120.0


class Traffic:
    """Runs the plan's senders in threads against one MedBridge: ``start()``, then ``join()``."""

    def __init__(self, plan: Plan, http_base: str, dicom_port: int, folder: Path, ledger: Ledger) -> None:
        self.plan = plan
        self.http_base = http_base
        self.dicom_port = dicom_port
        self.ledger = ledger
        # hostile studies first: the good ones arrive while the bad one is due
        self.studies = [make_study(folder / f"hostile{i}", plan.instances, hostile=True)
                        for i in range(plan.hostile_studies)]
        self.studies += [make_study(folder / f"study{i}", plan.instances) for i in range(plan.studies)]
        self.threads: list[threading.Thread] = []
        self.reviewer: threading.Thread | None = None
        self.deadline = 0.0
        self.stopping = threading.Event()

    def start(self) -> None:
        self.deadline = time.monotonic() + self.plan.deadline_s
        waves = max(1, -(-len(self.studies) // self.plan.parallel))
        gap = self.plan.span_s / waves
        for n, study in enumerate(self.studies):
            self._spawn(self._send_study, study, (n // self.plan.parallel) * gap)
        self._spawn(self._send_bundles)
        self.reviewer = threading.Thread(target=self._review, daemon=True)
        self.reviewer.start()

    def join(self, review_grace_s: float = 30.0) -> None:
        """Waits for the senders, then gives the reviewer ``review_grace_s`` more to find its reports."""
        for t in self.threads:
            t.join()
        if self.reviewer is not None:
            self.reviewer.join(review_grace_s)
            self.stopping.set()
            self.reviewer.join()

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self.threads.append(t)

    def _running(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() < self.deadline

    # DICOM --------------------------------------------------------------------------------------
    def _send_study(self, study: Study, delay: float) -> None:
        if self.stopping.wait(delay):
            return
        ae = AE(ae_title="FAULTS_SCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        pending = list(study.instances)
        assoc = None
        while pending and self._running():
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", self.dicom_port, ae_title="MEDBRIDGE")
                if not assoc.is_established:
                    self.ledger.refused("association rejected" if assoc.is_rejected else "no association")
                    assoc = None
                    time.sleep(0.5)
                    continue
            ds = dcmread(pending[0].path)
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, ValueError, OSError):
                status = None
            code = int(status.Status) if status is not None and "Status" in status else None
            if code in ACCEPTED:
                self.ledger.acknowledged(pending.pop(0))
            else:
                self.ledger.refused("no answer" if code is None else f"status 0x{code:04X}")
                if code is not None and 0xC000 <= code <= 0xCFFF:
                    pending.pop(0)  # "cannot understand": sending it again will not help
                    continue
                if not assoc.is_established:
                    assoc = None
                time.sleep(0.5)
        if assoc is not None and assoc.is_established:
            assoc.release()

    # FHIR ---------------------------------------------------------------------------------------
    def _send_bundles(self) -> None:
        with httpx.Client(base_url=self.http_base, timeout=30,
                          headers=authorized.headers("integration")) as client:
            for n in range(self.plan.bundles):
                if not self._running():
                    return
                bundle = demo_bundle(mrn=f"FAULT-{random.getrandbits(40):010x}-{n}")
                try:
                    r = client.post("/fhir", json=bundle, headers={"Content-Type": "application/fhir+json"})
                except httpx.TransportError:
                    self.ledger.unreachable()
                else:
                    self.ledger.answered(r.status_code)
                    if 200 <= r.status_code < 300:
                        locations = [e["response"]["location"].split("/_history")[0] for e in r.json()["entry"]]
                        with self.ledger.lock:
                            self.ledger.resources.extend(locations)
                            self.ledger.patients.append(locations[0])
                            self.ledger.last_ack = time.monotonic()
                time.sleep(self.plan.span_s / max(1, self.plan.bundles))

    # reviews ------------------------------------------------------------------------------------
    def _review(self) -> None:
        reviewer = authorized.token("reviewer", name="fault-reviewer")
        with httpx.Client(base_url=self.http_base, timeout=30,
                          headers={"Authorization": f"Bearer {reviewer}"}) as client:
            while len(self.ledger.reviews) < self.plan.reviews and self._running():
                time.sleep(1.0)
                try:
                    self._review_one(client)
                except httpx.TransportError:
                    self.ledger.unreachable()

    def _review_one(self, client: httpx.Client) -> None:
        r = client.get("/api/reports", params={"status": "preliminary", "limit": 500})
        self.ledger.answered(r.status_code)
        if r.status_code != 200:
            return
        ours = {s.uid for s in self.studies if not s.hostile}
        candidates = [rep["id"] for rep in r.json()
                      if rep["study_instance_uid"] in ours and rep["id"] not in self.ledger.reviews]
        if not candidates:
            return
        rid = candidates[0]
        detail = client.get(f"/api/reports/{rid}")
        self.ledger.answered(detail.status_code)
        if detail.status_code != 200:
            return
        r = client.post(f"/api/reports/{rid}/review", json={"action": "final"},
                        headers={"If-Match": detail.headers["ETag"]})
        self.ledger.answered(r.status_code)
        if r.status_code == 200:
            with self.ledger.lock:
                self.ledger.reviews[rid] = "final"
                self.ledger.last_ack = time.monotonic()
