"""Which writes change what a clinical impression is drafted from, so only those draft a new report.

The clinical worker reasons over a patient's conditions, abnormal observations and medications
(integration.fhir.patient_context). A write of anything else (a Patient's address, an Encounter, a
normal lab value, a new ``meta.tag``) would only redraft the same impression: a flood of identical
drafts on real EHR traffic. A write drafts a report when:

- a Condition is new, or its code, clinical or verification status, severity or body site changed;
- an Observation is abnormal (an interpretation of H/L/A and their kin, or a numeric value outside
  its referenceRange) in its new or its previous version, and what the impression reads of it (code,
  value, interpretation, range, status) changed: a new abnormal value, or an abnormal one corrected
  back to normal;
- a MedicationRequest or MedicationStatement is new, or its medication, status or dosage changed.

Deletions and the other types never draft (the next relevant write's report reads the record as it is),
nor does anything labelled AI-asserted (``meta.security`` AIAST: MedBridge's own segmentation volumes and
finding probabilities, or an EHR's copy of them): the impression is drafted from what clinicians and devices
recorded, never from a model's earlier output, which would feed a model's guess back to it as a fact.
"""

from __future__ import annotations

from typing import Any

# v3-ObservationInterpretation codes meaning "outside the normal range" (high, low, abnormal, critical,
# off scale, significantly changed); N and the susceptibility codes (S, R, I) are not
ABNORMAL_INTERPRETATIONS = frozenset({"H", "HH", "HU", "HX", "L", "LL", "LU", "LX", "A", "AA", ">", "<", "W", "U", "D"})

# the elements each type's impression reads: a change anywhere else is not a change of the impression
_CONDITION = ("code", "clinicalStatus", "verificationStatus", "severity", "bodySite")
_OBSERVATION = ("code", "status", "interpretation", "referenceRange", "component", "valueQuantity",
                "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger", "valueRange")
_MEDICATION = ("medicationCodeableConcept", "medicationReference", "status", "dosageInstruction", "dosage")
_READ_BY_IMPRESSION: dict[str, tuple[str, ...]] = {
    "Condition": _CONDITION,
    "Observation": _OBSERVATION,
    "MedicationRequest": _MEDICATION,
    "MedicationStatement": _MEDICATION,
}
# the types whose writes can draft a report (the others never need their previous version read)
IMPRESSION_TYPES = frozenset(_READ_BY_IMPRESSION)


def is_ai_asserted(resource: dict[str, Any]) -> bool:
    """Whether ``resource`` carries the AIAST security label (v3-ObservationValue: AI asserted)."""
    return any(label.get("code") == "AIAST" for label in (resource.get("meta") or {}).get("security") or [])


def _codes(concepts: list[dict[str, Any]] | None) -> set[str]:
    return {str(c.get("code", "")).upper() for concept in concepts or [] for c in concept.get("coding") or []}


def _outside_range(value: dict[str, Any] | None, ranges: list[dict[str, Any]] | None) -> bool:
    """Whether a Quantity lies outside the first referenceRange bound it can be compared with (same unit
    code where both name one)."""
    if not isinstance(value, dict) or not isinstance(value.get("value"), int | float):
        return False
    number, unit = float(value["value"]), value.get("code")
    for rng in ranges or []:
        for bound, outside in (("low", number.__lt__), ("high", number.__gt__)):
            limit = rng.get(bound) or {}
            if not isinstance(limit.get("value"), int | float):
                continue
            if unit and limit.get("code") and unit != limit.get("code"):
                continue  # another unit: not comparable without a conversion table
            if outside(float(limit["value"])):
                return True
    return False


def is_abnormal(observation: dict[str, Any]) -> bool:
    """An interpretation flags it (H, L, A, ...), or a value (its own or a component's) lies outside its
    referenceRange."""
    parts = [observation, *(observation.get("component") or [])]
    return any(
        _codes(part.get("interpretation")) & ABNORMAL_INTERPRETATIONS
        or _outside_range(part.get("valueQuantity"), part.get("referenceRange") or observation.get("referenceRange"))
        for part in parts
    )


def _read_part(resource: dict[str, Any], elements: tuple[str, ...]) -> dict[str, Any]:
    return {name: resource.get(name) for name in elements}


def changes_impression(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    """Whether writing ``after`` over ``before`` (None: a create) changes what a clinical impression is
    drafted from (the rules in the module docstring)."""
    elements = _READ_BY_IMPRESSION.get(after.get("resourceType", ""))
    if elements is None or is_ai_asserted(after):
        return False
    if after["resourceType"] == "Observation":
        if not (is_abnormal(after) or (before is not None and is_abnormal(before))):
            return False
    return before is None or _read_part(before, elements) != _read_part(after, elements)
