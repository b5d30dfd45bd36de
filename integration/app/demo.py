"""`medbridge send-demo`: a demo study over DICOM and a demo patient over FHIR, then the reports."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]


def demo_bundle(mrn: str | None = None) -> dict[str, Any]:
    """A transaction Bundle: a fictitious patient with type 2 diabetes and raised HbA1c."""
    mrn = mrn or f"DEMO-{uuid.uuid4().hex[:8]}"
    p, c, o1, o2 = (f"urn:uuid:{uuid.uuid4()}" for _ in range(4))
    subject = {"reference": p}
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": p, "request": {"method": "POST", "url": "Patient"}, "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": "urn:demo:mrn", "value": mrn}],
                "name": [{"family": "Demo", "given": ["Pat"]}],
                "gender": "female", "birthDate": "1961-04-12"}},
            {"fullUrl": c, "request": {"method": "POST", "url": "Condition"}, "resource": {
                "resourceType": "Condition", "subject": subject,
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                               "code": "active"}]},
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9",
                                     "display": "Type 2 diabetes mellitus without complications"}],
                         "text": "Type 2 diabetes mellitus"}}},
            {"fullUrl": o1, "request": {"method": "POST", "url": "Observation"}, "resource": {
                "resourceType": "Observation", "status": "final", "subject": subject,
                "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4",
                                     "display": "Hemoglobin A1c/Hemoglobin.total in Blood"}], "text": "HbA1c"},
                "effectiveDateTime": "2026-11-20",
                "valueQuantity": {"value": 8.2, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
                "interpretation": [{"text": "high"}]}},
            {"fullUrl": o2, "request": {"method": "POST", "url": "Observation"}, "resource": {
                "resourceType": "Observation", "status": "final", "subject": subject,
                "code": {"coding": [{"system": "http://loinc.org", "code": "1558-6",
                                     "display": "Fasting glucose [Mass/volume] in Serum or Plasma"}],
                         "text": "Fasting glucose"},
                "effectiveDateTime": "2026-11-20",
                "valueQuantity": {"value": 162, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                  "code": "mg/dL"}}},
        ],
    }


def send_study(host: str, port: int, ae_title: str, path: str | None = None) -> tuple[str, int]:
    """C-STORE one file; returns (Study Instance UID, DIMSE status)."""
    ds = dcmread(path or get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="MEDBRIDGE_DEMO")
    ae.add_requested_context(ds.SOPClassUID if path else CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise SystemExit(f"could not associate with {ae_title}@{host}:{port}; is `medbridge run` up?")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return str(ds.StudyInstanceUID), int(status.Status) if status else -1


def wait_for_reports(client: httpx.Client, subjects: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len({r["subject"]["reference"] for r in found.values()}) < len(subjects):
        for subject in subjects:
            bundle = client.get("/fhir/DiagnosticReport", params={"subject": subject}).json()
            for e in bundle.get("entry", []):
                found[e["resource"]["id"]] = e["resource"]
        time.sleep(1.0)
    return list(found.values())


def run_demo(api_url: str, dicom_host: str, dicom_port: int, ae_title: str, token: str, timeout: float = 300) -> int:
    """Send the demo study and patient; ``token`` is a bearer token with the integration role."""
    with httpx.Client(base_url=api_url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        study_uid, status = send_study(dicom_host, dicom_port, ae_title)
        print(f"C-STORE CT_small.dcm -> status 0x{status:04X}")
        r = client.post("/fhir", json=demo_bundle(), headers={"Content-Type": "application/fhir+json"})
        r.raise_for_status()
        patient_ref = r.json()["entry"][0]["response"]["location"].split("/_history")[0]
        print(f"FHIR transaction -> {r.status_code}, patient {patient_ref}")
        imaging_subject = None
        deadline = time.monotonic() + 60
        while imaging_subject is None and time.monotonic() < deadline:
            b = client.get("/fhir/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"}).json()
            if b.get("entry"):
                imaging_subject = b["entry"][0]["resource"]["subject"].get("reference")
            else:
                time.sleep(0.5)
        subjects = [patient_ref] + ([imaging_subject] if imaging_subject else [])
        reports = wait_for_reports(client, subjects, timeout)
        for rep in reports:
            print(f"\nDiagnosticReport/{rep['id']} [{rep['status']}] {rep['code'].get('text')}")
            print(f"  subject: {rep.get('subject', {}).get('reference')}")
            print(f"  conclusion: {rep.get('conclusion')}")
        if len(reports) < len(subjects):
            print("\nnot every report arrived in time; check the service log and /api/dead-letters")
            return 1
        return 0
