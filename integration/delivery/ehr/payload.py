"""What an EHR writeback sends: the FHIR content of an issued report and of a reviewer's action.

Built inside the report writer's (or the review's) transaction and kept as the ``ehr`` delivery job's
payload, so what is sent is what was decided when the change committed:

- an issued report goes as one FHIR ``transaction`` Bundle: the DiagnosticReport, an Observation per
  AI finding, the model as a Device, MedBridge as a Device, and a Provenance naming the model as
  author (HL7 AI Transparency on FHIR). AI-asserted resources carry the ``AIAST`` security label.
  Every entry is a conditional create (``ifNoneExist`` on a MedBridge identifier or tag), so a retry
  after a lost response never duplicates anything upstream;
- a reviewer's action goes as the updated report (``{"report": ...}``), which the sender PUTs.

Patients and studies are referenced by their identifiers, so the EHR resolves them to its own records.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from integration.db.tables import FhirResource, stable_id, utcnow
from integration.fhir.resources import AI_ASSERTED

OBSERVATION_SYSTEM = "urn:medbridge:observation"
DEVICE_SYSTEM = "urn:medbridge:device"
PROVENANCE_TAG_SYSTEM = "urn:medbridge:provenance"
AI_PROVENANCE_PROFILE = "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Provenance"
MEDBRIDGE_VERSION = "0.1.0"


def _logical_reference(s: Session, ref: str | None) -> dict[str, Any] | None:
    """A local reference as the upstream server can resolve it: by the target's identifier."""
    if not ref or "/" not in ref:
        return None
    rtype, rid = ref.split("/", 1)
    row = s.get(FhirResource, (rtype, rid))
    for ident in (row.content.get("identifier") or []) if row is not None else []:
        if ident.get("system") and ident.get("value"):
            return {"type": rtype, "identifier": {"system": ident["system"], "value": ident["value"]}}
    return None


def upstream_report(s: Session, report: dict[str, Any]) -> dict[str, Any]:
    """The local report reshaped for the upstream server: no local id, references by identifier."""
    out = {k: v for k, v in report.items() if k not in ("id", "meta", "result", "subject", "imagingStudy")}
    out["meta"] = {"security": [AI_ASSERTED]}
    subject = _logical_reference(s, (report.get("subject") or {}).get("reference"))
    if subject:
        out["subject"] = subject
    studies = [_logical_reference(s, r.get("reference")) for r in report.get("imagingStudy") or []]
    if any(studies):
        out["imagingStudy"] = [r for r in studies if r]
    return out


def _finding_observations(
    report_id: str, report: dict[str, Any], details: dict[str, Any], subject: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One AI-asserted Observation per finding label: its highest probability over the images."""
    instances = details.get("instances") or []
    if not instances:
        return []
    out = []
    for name in instances[0].get("probabilities", {}):
        top = max(float(i["probabilities"].get(name, 0.0)) for i in instances)
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": {"security": [AI_ASSERTED]},
            "identifier": [{"system": OBSERVATION_SYSTEM, "value": stable_id("upstream-observation", report_id, name)}],
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "imaging",
                        }
                    ]
                }
            ],
            "code": {"text": f"AI probability of {name.replace('_', ' ')}"},
            "valueQuantity": {"value": round(top, 4), "unit": "probability", "system": "http://unitsofmeasure.org",
                              "code": "1"},
            "issued": report.get("issued"),
        }
        if subject:
            obs["subject"] = subject
        out.append(obs)
    return out


def _made_by_medbridge(observation: dict[str, Any]) -> bool:
    return (AI_ASSERTED in (observation.get("meta") or {}).get("security", [])
            and any(i.get("system") == OBSERVATION_SYSTEM for i in observation.get("identifier") or []))


def _result_observations(s: Session, report: dict[str, Any], subject: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The AI Observations the local report lists in ``result`` (a segmentation's volumes), reshaped for the
    upstream server: no local id, references by identifier. A clinical report's ``result`` names the patient's
    own Observations it used: those are the EHR's already, and are not sent back."""
    out = []
    for ref in report.get("result") or []:
        rtype, _, rid = str(ref.get("reference") or "").partition("/")
        row = s.get(FhirResource, (rtype, rid)) if rtype == "Observation" else None
        if row is None or not _made_by_medbridge(row.content):
            continue
        obs = {k: v for k, v in row.content.items() if k not in ("id", "meta", "subject", "derivedFrom")}
        obs["meta"] = {"security": [AI_ASSERTED]}
        if subject:
            obs["subject"] = subject
        derived = [_logical_reference(s, r.get("reference")) for r in row.content.get("derivedFrom") or []]
        if any(derived):
            obs["derivedFrom"] = [r for r in derived if r]
        out.append(obs)
    return out


def _device(name: str, version: str, kind: str) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_SYSTEM, "value": stable_id("device", name, version)}],
        "deviceName": [{"name": name, "type": "model-name"}],
        "version": [{"value": version}],
        "type": {"text": kind},
        "manufacturer": "MedBridge",
    }


def _entry(resource: dict[str, Any], if_none_exist: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": if_none_exist},
    }


def _ident_query(resource: dict[str, Any]) -> str:
    ident = resource["identifier"][0]
    return f"identifier={ident['system']}|{ident['value']}"


def report_transaction(s: Session, report: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """The transaction Bundle for an issued report: DiagnosticReport, Observations, Devices, Provenance.

    Entry 0 is always the DiagnosticReport and entries 1..n its Observations (the sender reads the
    upstream ids back from those positions of the transaction-response)."""
    report_id = report["id"]
    body = upstream_report(s, report)
    model = _device(details.get("model_name") or "unknown model", details.get("model_version") or "unversioned",
                    "AI model")
    medbridge = _device("MedBridge", MEDBRIDGE_VERSION, "integration software")
    observations = (_finding_observations(report_id, report, details, body.get("subject"))
                    + _result_observations(s, report, body.get("subject")))
    dr_entry = _entry(body, _ident_query(body))
    obs_entries = [_entry(o, _ident_query(o)) for o in observations]
    model_entry = _entry(model, _ident_query(model))
    medbridge_entry = _entry(medbridge, _ident_query(medbridge))
    for o in obs_entries:
        o["resource"]["device"] = {"reference": model_entry["fullUrl"]}
    if obs_entries:
        body["result"] = [{"reference": o["fullUrl"]} for o in obs_entries]
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "meta": {"profile": [AI_PROVENANCE_PROFILE], "tag": [{"system": PROVENANCE_TAG_SYSTEM, "code": report_id}]},
        "target": [{"reference": dr_entry["fullUrl"]}] + [{"reference": o["fullUrl"]} for o in obs_entries],
        "recorded": report.get("issued") or utcnow().isoformat(),
        "policy": ["http://hl7.org/fhir/uv/aitransparency"],
        "activity": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                         "code": "author"}
                    ]
                },
                "who": {"reference": model_entry["fullUrl"]},
            },
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                         "code": "assembler"}
                    ]
                },
                "who": {"reference": medbridge_entry["fullUrl"]},
            },
        ],
    }
    sources = [_logical_reference(s, r) for r in (details.get("input_refs") or [])]
    if any(sources):
        provenance["entity"] = [{"role": "source", "what": r} for r in sources if r]
    prov_entry = _entry(provenance, f"_tag={PROVENANCE_TAG_SYSTEM}|{report_id}")
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [dr_entry, *obs_entries, model_entry, medbridge_entry, prov_entry],
    }


def review_update(s: Session, report: dict[str, Any]) -> dict[str, Any]:
    """The payload of a reviewer's action: the reviewed report as the upstream server will hold it."""
    return {"report": upstream_report(s, report)}
