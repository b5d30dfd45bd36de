"""The counts at the end of a fault run: what was acknowledged but is missing, and what was
delivered zero times or twice. Every count is expected to be zero.

The checks go through MedBridge's own HTTP API (QIDO-RS, WADO-RS, FHIR reads, /api/reports), the
upstream EHR stand-in's FHIR search (directly, not through the proxy) and Orthanc's REST API.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from integration.delivery.pacs.export import export_uid, version_part
from tests import authorized
from tests.faults.peers import Orthanc, UpstreamFhir
from tests.faults.traffic import Ledger, Study

REPORT_SYSTEM = "urn:medbridge:report"
NOT_CURRENT = {"entered-in-error", "cancelled"}


@dataclass
class Counts:
    instances_missing: int = 0  # acknowledged, but not found by QIDO-RS or not retrievable by WADO-RS
    resources_missing: int = 0  # in a 2xx transaction, but not readable
    studies_without_one_report: int = 0  # good studies with an acknowledged instance and 0 or 2+ current reports
    records_without_one_report: int = 0  # acknowledged patients with 0 or 2+ current clinical reports
    reviews_missing: int = 0  # a review answered 200, but the report is not in that state
    upstream_missing: int = 0  # reports never delivered to the EHR
    upstream_twice: int = 0  # reports delivered to the EHR more than once
    pacs_missing: int = 0  # SRs (issued or reviewed) not in Orthanc
    pacs_extra: int = 0  # SRs in Orthanc beyond one per report version (a report twice)
    server_errors: int = 0  # 5xx answers to the traffic
    log_lines_with_raw_uids: int = 0  # runtime log lines naming a study or instance UID in the clear
    detail: dict[str, Any] = field(default_factory=dict)

    def nonzero(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "detail" and v}


def _reports(client: httpx.Client, ledger: Ledger, studies: list[Study]) -> list[dict[str, Any]]:
    """The AI reports of this run's studies and patients (a stack may serve several runs), any status."""
    ours = {s.uid for s in studies} | set(ledger.patients)
    out: list[dict[str, Any]] = []
    for status in ("preliminary", "final", "amended", "corrected", "appended", "entered-in-error", "cancelled"):
        r = client.get("/api/reports", params={"status": status, "limit": 500})
        r.raise_for_status()
        out += [rep for rep in r.json() if rep["study_instance_uid"] in ours or rep["subject"] in ours]
    return out


def _sr_uids_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[str]:
    uids = []
    with orthanc.rest() as rest:
        for series in orthanc.series_of_study(study_uid):
            if series["MainDicomTags"].get("Modality") != "SR":
                continue
            for instance in series["Instances"]:
                tags = rest.get(f"/instances/{instance}/simplified-tags").json()
                uids.append(tags["SOPInstanceUID"])
    return uids


def _upstream_copies(upstream: UpstreamFhir, report_id: str) -> int:
    return len(upstream.search(f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report_id}"))


def pending(ledger: Ledger, studies: list[Study], http_base: str, upstream: UpstreamFhir | None,
            orthanc: Orthanc | None) -> list[str]:
    """What is not delivered yet (empty: all of it): a good acknowledged study or patient without a
    report, a report not upstream, an SR not in the PACS."""
    waiting = []
    acked_studies = {i.study for i in ledger.instances.values()}
    with authorized.Client(base_url=http_base, timeout=30) as client:
        reports = _reports(client, ledger, studies)
    by_study = Counter(r["study_instance_uid"] for r in reports if r["kind"] == "imaging")
    by_subject = Counter(r["subject"] for r in reports if r["kind"] == "clinical")
    waiting += [f"report of study {s.uid[-8:]}" for s in studies
                if not s.hostile and s.uid in acked_studies and not by_study[s.uid]]
    waiting += [f"report of {p}" for p in ledger.patients if not by_subject[p]]
    for r in reports:
        if r["status"] in NOT_CURRENT:
            continue
        if upstream is not None and _upstream_copies(upstream, r["id"]) == 0:
            waiting.append(f"report {r['id']} upstream")
        if orthanc is not None and r["kind"] == "imaging":
            sr = export_uid(r["id"], version_part("sr-instance", 1 if r["id"] in ledger.reviews else 0))
            if sr not in _sr_uids_in_orthanc(orthanc, r["study_instance_uid"]):
                waiting.append(f"report {r['id']} in the PACS")
    return waiting


def wait_until_delivered(ledger: Ledger, studies: list[Study], http_base: str, upstream: UpstreamFhir | None,
                         orthanc: Orthanc | None, timeout: float) -> tuple[float | None, list[str]]:
    """Polls until nothing is pending; (monotonic time it was seen complete or None, what is left)."""
    deadline = time.monotonic() + timeout
    left: list[str] = ["(not checked)"]
    while time.monotonic() < deadline:
        try:
            left = pending(ledger, studies, http_base, upstream, orthanc)
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            left = [f"check failed: {exc!r}"]
        if not left:
            return time.monotonic(), []
        time.sleep(1.0)
    return None, left


def count(ledger: Ledger, studies: list[Study], http_base: str, upstream: UpstreamFhir | None,
          orthanc: Orthanc | None, *, allowed_5xx: tuple[int, ...] = ()) -> Counts:
    """The final counts (see ``Counts``); ``allowed_5xx`` are statuses the fault makes right (a 503
    while the database is down, a 507 on a full disk): they are reported in ``detail``, not counted."""
    c = Counts()
    c.server_errors = ledger.server_errors(*allowed_5xx)
    c.detail["http_statuses"] = dict(sorted(ledger.http_statuses.items()))
    c.detail["http_unreachable"] = ledger.http_unreachable
    c.detail["dicom_refusals"] = dict(ledger.dicom_refusals)
    c.detail["acknowledged"] = {"instances": len(ledger.instances), "resources": len(ledger.resources),
                                "reviews": len(ledger.reviews)}
    with authorized.Client(base_url=http_base, timeout=60) as client:
        by_study: dict[str, set[str]] = {}
        for inst in ledger.instances.values():
            by_study.setdefault(inst.study, set()).add(inst.sop)
        for study, sops in by_study.items():
            r = client.get(f"/dicomweb/studies/{study}/instances")
            found = {m["00080018"]["Value"][0] for m in r.json()} if r.status_code == 200 else set()
            for sop in sops:
                inst = ledger.instances[sop]
                if sop not in found or client.get(
                        f"/dicomweb/studies/{study}/series/{inst.series}/instances/{sop}").status_code != 200:
                    c.instances_missing += 1
        c.resources_missing = sum(client.get(f"/fhir/{ref}").status_code != 200 for ref in ledger.resources)

        reports = _reports(client, ledger, studies)
        current = [r for r in reports if r["status"] not in NOT_CURRENT]
        per_study = Counter(r["study_instance_uid"] for r in current if r["kind"] == "imaging")
        per_patient = Counter(r["subject"] for r in current if r["kind"] == "clinical")
        good = [s for s in studies if not s.hostile and s.uid in by_study]
        c.studies_without_one_report = sum(per_study[s.uid] != 1 for s in good)
        c.records_without_one_report = sum(per_patient[p] != 1 for p in ledger.patients)
        c.detail["reports_per_study"] = sorted(per_study[s.uid] for s in good)
        status_of = {r["id"]: r["status"] for r in reports}
        c.reviews_missing = sum(status_of.get(rid) != action for rid, action in ledger.reviews.items())

    for r in current:
        if upstream is not None:
            copies = _upstream_copies(upstream, r["id"])
            c.upstream_missing += copies == 0
            c.upstream_twice += copies > 1
        if orthanc is not None and r["kind"] == "imaging":
            reviewed = r["id"] in ledger.reviews
            expected = {export_uid(r["id"], version_part("sr-instance", n)) for n in range(2 if reviewed else 1)}
            found = _sr_uids_in_orthanc(orthanc, r["study_instance_uid"])
            c.pacs_missing += len(expected - set(found))
    if orthanc is not None:
        # SRs beyond one per version of each current report (a study with two reports exports twice)
        for study in {r["study_instance_uid"] for r in current if r["kind"] == "imaging"}:
            mine = [r for r in current if r["kind"] == "imaging" and r["study_instance_uid"] == study]
            expected_n = sum(2 if r["id"] in ledger.reviews else 1 for r in mine[:1])
            c.pacs_extra += max(0, len(_sr_uids_in_orthanc(orthanc, study)) - expected_n)
    return c
