"""Builds the typed, identifier-free :class:`PatientContext` from a patient's stored FHIR records."""

from __future__ import annotations

from datetime import date
from typing import Any

from integration.db.store import Store
from integration.errors import ResourceNotFoundError
from integration.fhir.clinical_change import is_ai_asserted
from integration.fhir.storage import get_resource, search_resources
from schemas.clinical import CodedItem, ObservationItem, PatientContext


def _concept_text(concept: dict[str, Any] | None) -> tuple[str | None, str | None, str | None]:
    """(display, code, system) of a CodeableConcept."""
    if not concept:
        return None, None, None
    codings = concept.get("coding") or []
    first = codings[0] if codings else {}
    display = concept.get("text") or first.get("display") or first.get("code")
    return display, first.get("code"), first.get("system")


def _age(birth_date: str | None, today: date) -> int | None:
    if not birth_date or len(birth_date) < 4 or not birth_date[:4].isdigit():
        return None
    year = int(birth_date[:4])
    month = int(birth_date[5:7]) if len(birth_date) >= 7 else 1
    day = int(birth_date[8:10]) if len(birth_date) >= 10 else 1
    return today.year - year - ((today.month, today.day) < (month, day))


def _observation(obs: dict[str, Any]) -> ObservationItem | None:
    display, _, _ = _concept_text(obs.get("code"))
    if not display:
        return None
    value, unit = None, None
    if "valueQuantity" in obs:
        value, unit = str(obs["valueQuantity"].get("value")), obs["valueQuantity"].get("unit")
    elif "valueCodeableConcept" in obs:
        value = _concept_text(obs["valueCodeableConcept"])[0]
    elif "valueString" in obs:
        value = obs["valueString"][:200]
    elif "component" in obs:
        parts = []
        for c in obs["component"]:
            name = _concept_text(c.get("code"))[0]
            q = c.get("valueQuantity") or {}
            if name and "value" in q:
                parts.append(f"{name} {q['value']} {q.get('unit', '')}".strip())
        value = "; ".join(parts) or None
    interp = _concept_text((obs.get("interpretation") or [None])[0])[0]
    return ObservationItem(
        display=display,
        value=value,
        unit=unit,
        effective=str(obs.get("effectiveDateTime", ""))[:10] or None,
        interpretation=interp,
        ref=f"Observation/{obs['id']}",
    )


def _recorded(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What clinicians and devices recorded: ``resources`` without the AI-asserted ones."""
    return [r for r in resources if not is_ai_asserted(r)]


def build_patient_context(store: Store, patient_ref: str, today: date | None = None) -> PatientContext:
    today = today or date.today()
    age = sex = None
    pid = patient_ref.split("/", 1)[1]
    try:
        patient = get_resource(store, "Patient", pid)
        age, sex = _age(patient.get("birthDate"), today), patient.get("gender")
    except ResourceNotFoundError:  # a record can arrive before its Patient: reason without age/sex
        pass
    conditions, medications, observations = [], [], []
    # AI-asserted resources (MedBridge's own volumes and probabilities) are left out: see clinical_change
    for cond in _recorded(search_resources(store, "Condition", subject_ref=patient_ref, limit=100)[0]):
        display, code, system = _concept_text(cond.get("code"))
        if display:
            conditions.append(CodedItem(display=display, code=code, system=system, ref=f"Condition/{cond['id']}"))
    for obs in _recorded(search_resources(store, "Observation", subject_ref=patient_ref, limit=50)[0]):
        item = _observation(obs)
        if item:
            observations.append(item)
    # what is ordered and what the patient reports taking: both are medications the impression weighs
    for med_type in ("MedicationRequest", "MedicationStatement"):
        for med in _recorded(search_resources(store, med_type, subject_ref=patient_ref, limit=50)[0]):
            display, code, system = _concept_text(med.get("medicationCodeableConcept"))
            if display:
                medications.append(CodedItem(display=display, code=code, system=system, ref=f"{med_type}/{med['id']}"))
    return PatientContext(
        patient_ref=patient_ref,
        age_years=age,
        sex=sex,
        conditions=conditions,
        observations=observations,
        medications=medications,
    )
