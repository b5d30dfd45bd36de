"""The whole path over real sockets: DICOM and FHIR in, Kafka in between, DiagnosticReports out."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom import dcmread
from pydicom.data import get_testdata_file

from integration.app.demo import demo_bundle, send_study
from tests import authorized

CT_SMALL = get_testdata_file("CT_small.dcm")


async def wait_for(client: httpx.AsyncClient, path: str, params: dict[str, str], timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bundle = (await client.get(path, params=params)).json()
        if bundle.get("entry"):
            return [e["resource"] for e in bundle["entry"]]
        await asyncio.sleep(0.25)
    raise AssertionError(f"nothing at {path}?{params} after {timeout}s")


def base_url(stack) -> str:  # noqa: ANN001
    return f"http://127.0.0.1:{stack.settings.http_port}"


async def test_storescu_study_becomes_a_preliminary_diagnostic_report(stack) -> None:  # noqa: ANN001
    port = stack.dicom.port
    # a third-party SCU (dcmtk) sends the study
    proc = await asyncio.to_thread(
        subprocess.run, ["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(port), CT_SMALL],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    async with authorized.AsyncClient(base_url=base_url(stack), timeout=30) as client:
        study_uid = dcmread(CT_SMALL, stop_before_pixels=True).StudyInstanceUID
        studies = await wait_for(client, "/fhir/ImagingStudy", {"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"})
        assert studies[0]["numberOfInstances"] == 1
        subject = studies[0]["subject"]["reference"]
        reports = await wait_for(client, "/fhir/DiagnosticReport", {"subject": subject})
        report = reports[0]
        DiagnosticReport.model_validate(report)  # valid R4 (R4B model)
        assert report["status"] == "preliminary"
        assert report["imagingStudy"][0]["reference"] == f"ImagingStudy/{studies[0]['id']}"
        assert report["presentedForm"][0]["contentType"] == "image/png"
        assert report["meta"]["security"][0]["code"] == "AIAST"
        assert "not for clinical use" in report["conclusion"]
        # the same report through the query API, with its probabilities and heatmap
        detail = (await client.get(f"/api/reports/{report['id']}")).json()
        assert detail["kind"] == "imaging"
        probability = detail["instances"][0]["probabilities"]["synthetic_round_lesion"]
        assert 0.0 <= probability <= 1.0
        image = await client.get(f"/api/reports/{report['id']}/image.png")
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        # and by status
        prelim = await wait_for(client, "/fhir/DiagnosticReport", {"status": "preliminary"})
        assert report["id"] in {r["id"] for r in prelim}


async def test_patient_record_becomes_a_report_with_evidence(stack) -> None:  # noqa: ANN001
    async with authorized.AsyncClient(base_url=base_url(stack), timeout=30) as client:
        r = await client.post("/fhir", json=demo_bundle(), headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 200, r.text
        patient_ref = r.json()["entry"][0]["response"]["location"].split("/_history")[0]
        reports = await wait_for(client, "/fhir/DiagnosticReport", {"subject": patient_ref}, timeout=120)
        report = reports[0]
        DiagnosticReport.model_validate(report)
        assert report["status"] == "preliminary"
        assert report["conclusion"].strip()
        assert {ref["reference"].split("/")[0] for ref in report["result"]} == {"Observation"}
        detail = (await client.get(f"/api/reports/{report['id']}")).json()
        assert detail["kind"] == "clinical"
        assert detail["evidence"], "the impression must come with the passages it was given"
        assert any("E11" in (e.get("code") or "") or "diabetes" in e["text"].lower() for e in detail["evidence"])


async def test_review_makes_a_report_final_and_records_who(stack) -> None:  # noqa: ANN001
    study_uid, status = await asyncio.to_thread(send_study, "127.0.0.1", stack.dicom.port, "MEDBRIDGE")
    assert status == 0
    async with authorized.AsyncClient(base_url=base_url(stack), timeout=30) as client:
        reports = await wait_for(client, "/fhir/DiagnosticReport", {"status": "preliminary"})
        rid = reports[0]["id"]
        version = {"If-Match": (await client.get(f"/api/reports/{rid}")).headers["ETag"]}
        bad = await client.post(f"/api/reports/{rid}/review", json={"action": "amended"}, headers=version)
        assert bad.status_code == 422  # an amendment needs its text
        amended = await client.post(
            f"/api/reports/{rid}/review",
            json={"action": "amended", "reviewer": "dr-a", "conclusion": "No lesion on review."}, headers=version,
        )
        assert amended.status_code == 200, amended.text
        fhir = (await client.get(f"/fhir/DiagnosticReport/{rid}")).json()
        assert fhir["status"] == "amended" and fhir["conclusion"] == "No lesion on review."
        assert fhir["meta"]["versionId"] == "2"
        # who: the authenticated caller (the tests' token is for "pytest"), never the typed "reviewer"
        assert amended.json()["reviews"][0]["reviewer"] == "pytest"
        assert fhir["resultsInterpreter"] == [{"display": "pytest", "identifier": {
            "system": "urn:medbridge:sub", "value": "pytest"}}]
        provenance = (await client.get("/fhir/Provenance", params={"target": f"DiagnosticReport/{rid}"})).json()
        assert provenance["entry"][0]["resource"]["target"] == [{"reference": f"DiagnosticReport/{rid}/_history/2"}]
        assert (await client.get("/fhir/DiagnosticReport", params={"status": "preliminary"})).json()["total"] == 0


async def test_bad_input_at_each_edge_is_refused_and_good_input_still_flows(stack, tmp_path: Path) -> None:  # noqa: ANN001
    truncated = tmp_path / "truncated.dcm"
    data = Path(CT_SMALL).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    async with authorized.AsyncClient(base_url=base_url(stack), timeout=30) as client:
        # FHIR: an invalid resource is a 422 OperationOutcome naming the element
        r = await client.post("/fhir/Observation", json={"resourceType": "Observation", "status": "not-a-status",
                                                          "code": {"text": "x"}})
        assert r.status_code == 422
        assert r.json()["issue"][0]["expression"] == ["Observation.status"]
        # DICOM: a truncated file is refused with a failure status (dcmtk reports it)
        from pynetdicom import AE

        def send_truncated_then_good() -> tuple[int, int]:
            ae = AE()
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", stack.dicom.port, ae_title="MEDBRIDGE")
            assert assoc.is_established
            try:
                bad = assoc.send_c_store(str(truncated))
                good = assoc.send_c_store(CT_SMALL)
            finally:
                assoc.release()
            return int(bad.Status), int(good.Status)

        bad_status, good_status = await asyncio.to_thread(send_truncated_then_good)
        assert 0xC000 <= bad_status <= 0xCFFF
        assert good_status == 0
        reports = await wait_for(client, "/fhir/DiagnosticReport", {"status": "preliminary"})
        assert len(reports) == 1
        health = await client.get("/health")
        assert health.status_code == 200, health.text
        assert (await client.get("/api/dead-letters")).json() == []


async def test_logs_carry_no_patient_data(stack, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    import logging

    caplog.set_level(logging.DEBUG)
    header = dcmread(CT_SMALL, stop_before_pixels=True)
    bundle = demo_bundle(mrn="MRN-SECRET-4711")
    async with authorized.AsyncClient(base_url=base_url(stack), timeout=30) as client:
        await asyncio.to_thread(send_study, "127.0.0.1", stack.dicom.port, "MEDBRIDGE")
        r = await client.post("/fhir", json=bundle)
        patient_ref = r.json()["entry"][0]["response"]["location"].split("/_history")[0]
        await wait_for(client, "/fhir/DiagnosticReport", {"subject": patient_ref}, timeout=120)
        await wait_for(client, "/fhir/DiagnosticReport", {"status": "preliminary"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "stored instance" in text  # the pipeline did log
    patient = bundle["entry"][0]["resource"]
    for phi in (str(header.PatientName), str(header.PatientID), "MRN-SECRET-4711",
                patient["name"][0]["family"], patient["birthDate"]):
        assert phi not in text, f"{phi!r} leaked into the logs"
    # the birth year alone, as a number of its own: inside a longer run of digits (a timestamp's
    # microseconds, a hash) those four digits are not the patient's
    assert not re.search(r"(?<!\d)1961(?!\d)", text), "the birth year leaked into the logs"
    # MedBridge's own lines name studies and instances only by hashed UIDs
    ours = "\n".join(r.getMessage() for r in caplog.records
                     if r.name.split(".")[0] in {"integration", "inference", "knowledge", "medbridge"})
    for uid in (str(header.StudyInstanceUID), str(header.SOPInstanceUID)):
        assert uid not in ours, f"raw UID {uid} in MedBridge's logs"


async def test_send_demo_gets_both_reports_with_an_integration_token(stack, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    """`medbridge send-demo`'s path: a C-STORE and a FHIR transaction with an integration token, then both reports."""
    from integration.app.demo import run_demo

    code = await asyncio.to_thread(run_demo, base_url(stack), "127.0.0.1", stack.dicom.port, "MEDBRIDGE",
                                   authorized.token("integration"), 240)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "C-STORE CT_small.dcm -> status 0x0000" in printed and "FHIR transaction -> 200" in printed
    assert printed.count("DiagnosticReport/") >= 2 and "[preliminary]" in printed
