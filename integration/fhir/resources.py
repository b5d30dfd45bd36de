"""FHIR R4 content helpers: validation with fhir.resources (R4B models, which read R4 JSON for the
resources MedBridge handles), reference handling, and the resources MedBridge derives from DICOM.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
import pydicom
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import DicomInstance, FhirResource, FhirResourceVersion, FhirSearchIndex, stable_id
from integration.errors import InvalidResourceError
from integration.fhir.clinical_change import IMPRESSION_TYPES, changes_impression
from integration.fhir.storage import put_resource, put_resources

DICOM_PATIENT_ID_SYSTEM = "urn:medbridge:dicom:patient-id"
MEDBRIDGE_IDENTIFIER_SYSTEM = "urn:medbridge:report"
# The HL7 security label on resources an AI asserted (AI Transparency on FHIR)
AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"

# Required bindings fhir.resources does not enforce (it accepts Observation.status = "not-a-status").
# code elements: the allowed codes (R4 value sets; element path -> codes, lists are checked item by item)
_OBSERVATION_STATUS = {
    "registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown",
}
_REQUEST_STATUS = {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
_REQUEST_INTENT = {
    "proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order", "instance-order",
    "option",
}
_EVENT_STATUS = {
    "preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown",
}
_REQUIRED_CODES: dict[tuple[str, str], set[str]] = {
    ("Observation", "status"): _OBSERVATION_STATUS,
    ("DiagnosticReport", "status"): _OBSERVATION_STATUS | {"partial", "appended"},
    ("Patient", "gender"): {"male", "female", "other", "unknown"},
    ("MedicationRequest", "status"): {
        "active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown",
    },
    ("MedicationRequest", "intent"): _REQUEST_INTENT - {"directive"},
    ("MedicationRequest", "priority"): {"routine", "urgent", "asap", "stat"},
    ("ImagingStudy", "status"): {"registered", "available", "cancelled", "entered-in-error", "unknown"},
    ("Encounter", "status"): {
        "planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error",
        "unknown",
    },
    ("Procedure", "status"): _EVENT_STATUS,
    ("ServiceRequest", "status"): _REQUEST_STATUS,
    ("ServiceRequest", "intent"): _REQUEST_INTENT,
    ("ServiceRequest", "priority"): {"routine", "urgent", "asap", "stat"},
    ("DocumentReference", "status"): {"current", "superseded", "entered-in-error"},
    ("DocumentReference", "docStatus"): {"preliminary", "final", "amended", "entered-in-error"},
    ("AllergyIntolerance", "type"): {"allergy", "intolerance"},
    ("AllergyIntolerance", "category"): {"food", "medication", "environment", "biologic"},
    ("AllergyIntolerance", "criticality"): {"low", "high", "unable-to-assess"},
}
# CodeableConcepts bound (required) to one code system: codings in that system must use its codes
_REQUIRED_CONCEPTS: dict[tuple[str, str], tuple[str, set[str]]] = {
    ("Condition", "clinicalStatus"): (
        "http://terminology.hl7.org/CodeSystem/condition-clinical",
        {"active", "recurrence", "relapse", "inactive", "remission", "resolved"},
    ),
    ("Condition", "verificationStatus"): (
        "http://terminology.hl7.org/CodeSystem/condition-ver-status",
        {"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"},
    ),
    ("AllergyIntolerance", "clinicalStatus"): (
        "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
        {"active", "inactive", "resolved"},
    ),
    ("AllergyIntolerance", "verificationStatus"): (
        "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
        {"unconfirmed", "confirmed", "refuted", "entered-in-error"},
    ),
}


# the bindings above by resource type, in the same order (each resource looks up its own type's only)
_CODES_BY_TYPE: dict[str, list[tuple[str, set[str]]]] = {}
for (_type, _element), _allowed in _REQUIRED_CODES.items():
    _CODES_BY_TYPE.setdefault(_type, []).append((_element, _allowed))
_CONCEPTS_BY_TYPE: dict[str, list[tuple[str, tuple[str, set[str]]]]] = {}
for (_type, _element), _bound in _REQUIRED_CONCEPTS.items():
    _CONCEPTS_BY_TYPE.setdefault(_type, []).append((_element, _bound))
del _type, _element, _allowed, _bound


def _binding_issues(rtype: str, data: dict[str, Any]) -> list[tuple[str, str]]:
    """(expression, message) for each value outside a required value set."""
    issues = []
    for element, allowed in _CODES_BY_TYPE.get(rtype, ()):
        if element not in data:
            continue
        value = data[element]
        values = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, v in values:
            if v not in allowed:
                where = f"{rtype}.{element}" + (f"[{i}]" if i is not None else "")
                issues.append((where, f"'{v}' is not in the required value set ({', '.join(sorted(allowed))})"))
    for element, (system, codes) in _CONCEPTS_BY_TYPE.get(rtype, ()):
        concept = data.get(element)
        if not isinstance(concept, dict):
            continue
        codings = [c for c in concept.get("coding") or [] if isinstance(c, dict)]
        for i, coding in enumerate(codings):
            if coding.get("system") == system and coding.get("code") not in codes:
                issues.append((f"{rtype}.{element}.coding[{i}].code",
                               f"'{coding.get('code')}' is not a code of {system} ({', '.join(sorted(codes))})"))
        if not any(c.get("system") == system for c in codings):
            issues.append((f"{rtype}.{element}", f"a coding from {system} is required (required binding)"))
    return issues


# FHIR ids (http://hl7.org/fhir/R4/datatypes.html#id): fhir.resources checks the characters, not the length
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
ID_MAX = 64


def allowed_codes(resource_type: str, element: str) -> frozenset[str]:
    """The codes a required binding allows for ``resource_type.element`` (empty: not checked here)."""
    return frozenset(_REQUIRED_CODES.get((resource_type, element), ()))


def is_fhir_id(value: str) -> bool:
    """Whether ``value`` is a FHIR id (1 to 64 letters, digits, '-' and '.'): only such ids are ever stored."""
    return _ID.fullmatch(value) is not None


# FHIR strings hold no character below U+0020 other than tab, CR and LF (datatypes.html#string), and
# PostgreSQL's text and jsonb cannot hold U+0000 at all
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
def fhir_string(text: str) -> str:
    """``text`` without the control characters a FHIR string may not hold (all below U+0020 but tab, CR
    and LF): for text MedBridge writes itself, such as a model's output, which may emit any of them."""
    return _CONTROL.sub("", text)


# how orjson writes those characters: \u00XX, except \b and \f (a literal backslash before u00.., b or f
# matches too, and then the walk finds nothing)
_ESCAPED_CONTROL = re.compile(rb"\\(?:u00[01][0-9a-fA-F]|[bf])")


def _control_issues(rtype: str, data: dict[str, Any]) -> list[tuple[str, str]]:
    """(expression, message) for each string value (up to 20) holding a character FHIR strings may not hold.
    One orjson pass looks for them; the walk that names the elements only runs when it finds one."""
    try:
        if not _ESCAPED_CONTROL.search(orjson.dumps(data)):
            return []
    except TypeError:  # an integer beyond 64 bits (a decimal may be one): walk
        pass
    issues: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if len(issues) >= 20:
            return
        if isinstance(node, str):
            found = _CONTROL.search(node)
            if found:
                issues.append((where, f"a FHIR string cannot contain the control character U+{ord(found[0]):04X} "
                                      "(only tab, CR and LF): remove it"))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    for key, value in data.items():
        walk(value, f"{rtype}.{key}")
    return issues


def _expression(resource_type: str, loc: tuple[Any, ...]) -> str:
    parts = [resource_type]
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
        else:
            parts.append(str(item).rstrip("_"))
    return ".".join(parts)


def resource_model(resource_type: str) -> type[Resource]:
    """The R4B model class of a resource type; InvalidResourceError (404) for anything else,
    data types such as Quantity included."""
    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, KeyError):
        model = None
    if model is None or not issubclass(model, Resource):
        raise InvalidResourceError([("resourceType", f"{resource_type} is not a FHIR R4 resource type")], 404)
    return model


def validate_resource(data: Any, expected_type: str | None = None) -> dict[str, Any]:
    """Validate FHIR JSON; return it unchanged (what the sender wrote is what we keep).

    Raises InvalidResourceError with (expression, message) pairs: 404 for an unknown type,
    400 for a type mismatch, 422 for invalid content.
    """
    if not isinstance(data, dict):
        raise InvalidResourceError([("", "the body must be a JSON object")], 400)
    rtype = data.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise InvalidResourceError([("resourceType", "resourceType is required")], 400)
    if expected_type and rtype != expected_type:
        raise InvalidResourceError([("resourceType", f"body is a {rtype} but the URL names {expected_type}")], 400)
    model = resource_model(rtype)
    try:
        model.model_validate(data)
        issues = _binding_issues(rtype, data) + _control_issues(rtype, data)
        rid = data.get("id")
        if isinstance(rid, str) and len(rid) > ID_MAX:
            issues.append((f"{rtype}.id", f"an id is at most {ID_MAX} characters (letters, digits, '-' and '.')"))
    except ValidationError as exc:
        issues = [(_expression(rtype, tuple(e["loc"])), e["msg"]) for e in exc.errors()[:20]]
        raise InvalidResourceError(issues, 422) from None
    except RecursionError:
        # JSON nested deeper than the validators can recurse (the parser takes a little more)
        raise InvalidResourceError([("", "the resource is nested too deeply to validate")], 422) from None
    if issues:
        raise InvalidResourceError(issues, 422)
    return data


def normalise_reference(ref: str | None) -> str | None:
    """'http://x/fhir/Patient/1/_history/2' -> 'Patient/1'; None stays None."""
    if not ref:
        return None
    parts = [p for p in ref.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    return ref


def subject_of(resource: dict[str, Any]) -> str | None:
    """The patient a resource is about, as 'Patient/id'; None when it names none, or an id no Patient can
    have (longer than 64 characters, say: nothing stored is about it)."""
    if resource.get("resourceType") == "Patient":
        return f"Patient/{resource['id']}"
    for field in ("subject", "patient"):
        ref = (resource.get(field) or {}).get("reference") if isinstance(resource.get(field), dict) else None
        norm = normalise_reference(ref)
        if norm and norm.startswith("Patient/") and is_fhir_id(norm[8:]):
            return norm
    return None


def new_id() -> str:
    """A server-assigned resource id: a time-ordered UUID (version 7, RFC 9562: 48 bits of Unix time in ms,
    then 74 random bits). Ids assigned together sort together, so the inserts of a Bundle's resources enter
    the primary-key and search indexes at a few places instead of one random B-tree page each: fewer pages
    for each commit to write (with uuid4 ids, a transaction Bundle's commit took twice as long on SQLite)."""
    rand = int.from_bytes(os.urandom(10), "big")
    value = (time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64 | 0b10 << 62
    h = f"{value | rand & (1 << 62) - 1:032x}"  # str(uuid.UUID(int=...)), without building the UUID
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _version_key(stored: dict[str, Any]) -> tuple[str, str, int]:
    """The (type, id, version) of the version ``stored`` was written over."""
    return stored["resourceType"], stored["id"], int(stored["meta"]["versionId"]) - 1


def _previous_contents(s: Session, stored: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The versions the ``stored`` updates were written over, by ``_version_key`` (one query); a deleted
    version is left out: writing over it is a create as far as the impression goes."""
    keys = [_version_key(r) for r in stored]
    if not keys:
        return {}
    v = FhirResourceVersion
    rows = s.execute(select(v.resource_type, v.id, v.version_id, v.content).where(
        tuple_(v.resource_type, v.id, v.version_id).in_(keys), v.deleted.is_(False))).all()
    return {(rtype, rid, version): content for rtype, rid, version, content in rows}


def _previous_content(s: Session, stored: dict[str, Any]) -> dict[str, Any] | None:
    if stored["resourceType"] not in IMPRESSION_TYPES:
        return None  # changes_impression reads no other type
    return _previous_contents(s, [stored]).get(_version_key(stored))


def store_resource(
    s: Session, resource: dict[str, Any], *, if_match: int | None = None, track: bool = True
) -> tuple[dict[str, Any], bool]:
    """Store a validated resource and mark its patient's record as changed when the write changes what a
    clinical impression is drafted from (integration.fhir.clinical_change)."""
    subject = subject_of(resource)
    stored, created = put_resource(
        s,
        resource,
        if_match=if_match,
        subject_ref=subject,
        identifier=None,  # identifiers are matched through fhir_search_index (see integration.fhir.search)
    )
    if track and subject and changes_impression(None if created else _previous_content(s, stored), stored):
        Store.touch(s, "patient", subject)
    return stored, created


def store_resources(s: Session, resources: list[dict[str, Any]], *, fresh: list[bool] | None = None,
                    meanwhile: Callable[[], None] | None = None) -> list[tuple[dict[str, Any], bool]]:
    """``store_resource`` for every resource of a transaction, written with multi-row INSERTs; ``fresh``
    marks the resources whose ids ``new_id`` has just assigned, ``meanwhile`` runs before the writes are
    done (see ``fhir.storage.put_resources`` for both)."""
    subjects = [subject_of(r) for r in resources]
    results = put_resources(s, resources, subjects, fresh=fresh, meanwhile=meanwhile)
    updated = [stored for (stored, created), subj in zip(results, subjects, strict=True)
               if subj and not created and stored["resourceType"] in IMPRESSION_TYPES]
    before = _previous_contents(s, updated)
    changed = {subj for (stored, _), subj in zip(results, subjects, strict=True)
               if subj and changes_impression(before.get(_version_key(stored)), stored)}
    for subject in sorted(changed):  # once per patient: one change, however many resources it touched
        Store.touch(s, "patient", subject)
    return results


# Resources derived from DICOM --------------------------------------------------------------------
def _dicom_patient_name(name: Any) -> dict[str, Any] | None:
    if not name:
        return None
    pn = pydicom.valuerep.PersonName(name)
    entry: dict[str, Any] = {}
    if pn.family_name:
        entry["family"] = pn.family_name
    given = [g for g in (pn.given_name, pn.middle_name) if g]
    if given:
        entry["given"] = given
    return entry or None


def patient_for_dicom(s: Session, instances: list[DicomInstance]) -> str | None:
    """The Patient a study belongs to: an existing one whose identifier equals the DICOM Patient ID
    (the EHR's MRN, typically), else a Patient created from the DICOM header. Once the EHR has sent
    its Patient, it is the one chosen, also over a Patient an earlier study created from its header
    (the EHR is the patient index; the header's Patient only stood in for it)."""
    patient_id = next((i.patient_id for i in instances if i.patient_id), None)
    if not patient_id:
        return None
    pid = stable_id("dicom-patient", patient_id)
    matches = set(s.scalars(
        select(FhirSearchIndex.resource_id)
        .where(
            FhirSearchIndex.resource_type == "Patient",
            FhirSearchIndex.param == "identifier",
            FhirSearchIndex.value == patient_id,
        )
        .limit(16)
    ))
    if matches - {pid}:
        return f"Patient/{min(matches - {pid})}"  # min: the same choice every time among several
    if pid in matches or s.get(FhirResource, ("Patient", pid)) is not None:
        return f"Patient/{pid}"
    header = pydicom.dcmread(instances[0].path, stop_before_pixels=True)
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": DICOM_PATIENT_ID_SYSTEM, "value": patient_id}],
    }
    name = _dicom_patient_name(header.get("PatientName"))
    if name:
        patient["name"] = [name]
    sex = {"M": "male", "F": "female", "O": "other"}.get(str(header.get("PatientSex", "")).upper())
    if sex:
        patient["gender"] = sex
    bd = str(header.get("PatientBirthDate", "") or "")
    if len(bd) == 8 and bd.isdigit():
        patient["birthDate"] = f"{bd[:4]}-{bd[4:6]}-{bd[6:]}"
    validate_resource(patient)
    store_resource(s, patient, track=False)
    return f"Patient/{pid}"


def fhir_uid(uid: str) -> str:
    """A DICOM UID as ImagingStudy's ``series.uid`` / ``instance.uid`` (FHIR type ``id``): the UID itself
    when it is id-safe (digits and dots always are), else a deterministic stand-in made from its hash.
    The ingest accepts UIDs FHIR refuses (``1.2.3_abc``); one such study must still get its ImagingStudy
    and report rather than fail its announcement for ever."""
    if is_fhir_id(uid):
        return uid
    return "x-" + hashlib.sha256(uid.encode()).hexdigest()[:62]


def imaging_study_for(study_uid: str, instances: list[DicomInstance], patient_ref: str | None) -> dict[str, Any]:
    series: dict[str, list[DicomInstance]] = {}
    for inst in instances:
        series.setdefault(inst.series_instance_uid, []).append(inst)
    modalities = sorted({i.modality for i in instances if i.modality})
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": stable_id("imaging-study", study_uid),
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "status": "available",
        "subject": {"reference": patient_ref} if patient_ref else {"display": "unknown patient"},
        "numberOfSeries": len(series),
        "numberOfInstances": len(instances),
        "modality": [{"system": DCM_SYSTEM, "code": m} for m in modalities],
        "series": [
            {
                "uid": fhir_uid(uid),
                "modality": {"system": DCM_SYSTEM, "code": members[0].modality or "OT"},
                "numberOfInstances": len(members),
                "instance": [
                    {
                        "uid": fhir_uid(m.sop_instance_uid),
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{m.sop_class_uid}"},
                    }
                    for m in members
                ],
            }
            for uid, members in series.items()
        ],
    }
    return validate_resource(study)
