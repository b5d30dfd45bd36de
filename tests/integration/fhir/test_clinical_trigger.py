"""Which FHIR writes draft a clinical report: only those that change what the impression is drafted from,
debounced per patient in the store (a restart inside the debounce window loses nothing).

Writes go through the real FHIR API (single resources and a transaction Bundle) into the real store on
SQLite and PostgreSQL; the publisher that turns a quiet record into RecordReceived is the runtime's own."""

from __future__ import annotations

import time
from typing import Any

import httpx
from sqlalchemy import select

from integration.db.store import Store
from integration.db.tables import ChangeTracker, OutboxEntry
from integration.events.publisher import QuietPeriodPublisher, announce_record
from integration.fhir.clinical_change import changes_impression, is_abnormal
from integration.fhir.patient_context import build_patient_context
from integration.fhir.resources import AI_ASSERTED
from schemas.events import TOPIC_RECORD_RECEIVED, RecordReceived

LOINC = "http://loinc.org"


def glucose(value: float, *, flag: str | None = None, patient: str = "Patient/p1") -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final", "subject": {"reference": patient},
        "code": {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}]},
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
        "referenceRange": [{"low": {"value": 70, "code": "mg/dL"}, "high": {"value": 99, "code": "mg/dL"}}],
    }
    if flag:
        obs["interpretation"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                              "code": flag}]}]
    return obs


def condition(code: str = "E11.9", patient: str = "Patient/p1") -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": {"reference": patient},
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}], "text": code}}


def medication(patient: str = "Patient/p1") -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "subject": {"reference": patient}, "medicationCodeableConcept": {"text": "metformin 500 mg"}}


# the rules, on their own -----------------------------------------------------------------------------
def test_abnormal_means_a_flag_or_a_value_outside_its_reference_range() -> None:
    assert is_abnormal(glucose(85, flag="H"))  # flagged, whatever the value says
    assert is_abnormal(glucose(180)) and is_abnormal(glucose(50))  # outside 70-99, unflagged
    assert not is_abnormal(glucose(85)) and not is_abnormal(glucose(85, flag="N"))
    other_unit = glucose(180)
    other_unit["referenceRange"] = [{"high": {"value": 5.5, "code": "mmol/L"}}]
    assert not is_abnormal(other_unit)  # not comparable: not called abnormal


def test_only_writes_the_impression_reads_count_as_changes() -> None:
    address = {"resourceType": "Patient", "address": [{"city": "Lyon"}]}
    assert not changes_impression(None, address)
    assert not changes_impression(None, {"resourceType": "Encounter", "status": "finished"})
    assert not changes_impression(None, glucose(85))  # a normal value: the impression does not use it
    assert changes_impression(None, glucose(180))
    assert changes_impression(glucose(180), glucose(85))  # an abnormal value corrected back to normal
    assert not changes_impression(glucose(180), {**glucose(180), "note": [{"text": "re-filed"}]})
    assert changes_impression(None, condition()) and changes_impression(condition("E11.9"), condition("N18.3"))
    assert not changes_impression(condition(), {**condition(), "meta": {"tag": [{"code": "x"}]}})
    assert changes_impression(None, medication())
    assert changes_impression(medication(), {**medication(), "status": "stopped"})


def test_a_models_own_output_never_drafts_a_report() -> None:
    probability = {**glucose(180), "meta": {"security": [AI_ASSERTED]}}  # abnormal, but a model asserted it
    assert not changes_impression(None, probability)
    assert not changes_impression(None, {**condition(), "meta": {"security": [AI_ASSERTED]}})


# through the FHIR API and the store ------------------------------------------------------------------
def create(fhir: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    r = fhir.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return r.json()


def patient_revision(store: Store, patient_ref: str) -> int:
    with store.session() as s:
        tracker = s.get(ChangeTracker, ("patient", patient_ref))
        return tracker.revision if tracker else 0


def record_events(store: Store) -> list[RecordReceived]:
    with store.session() as s:
        rows = s.scalars(select(OutboxEntry.payload).where(OutboxEntry.topic == TOPIC_RECORD_RECEIVED)).all()
    return [RecordReceived.model_validate_json(p) for p in rows]


def test_irrelevant_writes_draft_nothing(store: Store, fhir_client: httpx.Client) -> None:
    fhir = fhir_client
    patient = create(fhir, {"resourceType": "Patient", "gender": "female", "birthDate": "1950-02-01"})
    ref = f"Patient/{patient['id']}"
    moved = {**patient, "address": [{"line": ["1 rue de la Paix"], "city": "Lyon"}]}
    assert fhir.put(f"/fhir/Patient/{patient['id']}", json=moved).status_code == 200
    create(fhir, glucose(85, patient=ref))  # a normal value
    create(fhir, {"resourceType": "Encounter", "status": "finished", "subject": {"reference": ref},
                  "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}})
    cond = create(fhir, condition(patient=ref))
    assert patient_revision(store, ref) == 1  # the Condition alone
    # a write that leaves what the impression reads as it was: no new revision
    assert fhir.put(f"/fhir/Condition/{cond['id']}", json={**cond, "note": [{"text": "seen"}]}).status_code == 200
    assert patient_revision(store, ref) == 1


def test_three_quick_relevant_writes_draft_one_report_even_across_a_restart(store: Store,
                                                                             fhir_client: httpx.Client) -> None:
    fhir = fhir_client
    ref = f"Patient/{create(fhir, {'resourceType': 'Patient'})['id']}"
    quiet = 0.6
    publisher = QuietPeriodPublisher(store, "patient", quiet, announce_record)
    create(fhir, condition(patient=ref))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": r["resourceType"]}, "resource": r}
        for r in (glucose(180, patient=ref), medication(patient=ref))]}
    r = fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    assert publisher.publish_due() == 0  # inside the debounce window
    # MedBridge restarts inside the window: the tracker is a row, so a new store and publisher find it
    reopened = Store(store.url)
    reopened.start()
    try:
        again = QuietPeriodPublisher(reopened, "patient", quiet, announce_record)
        deadline = time.monotonic() + 10
        while again.publish_due() == 0:
            assert time.monotonic() < deadline, "the record was never announced"
            time.sleep(0.1)
        assert again.publish_due() == 0
    finally:
        reopened.stop()
    (event,) = record_events(store)
    assert event.patient_ref == ref and event.revision == patient_revision(store, ref) == 2  # Condition; Bundle


def test_the_impression_is_drafted_from_what_was_recorded_not_from_ai_output(store: Store,
                                                                             fhir_client: httpx.Client) -> None:
    patient = create(fhir_client, {"resourceType": "Patient", "gender": "male", "birthDate": "1960-05-05"})
    ref = f"Patient/{patient['id']}"
    create(fhir_client, glucose(180, patient=ref))
    ai_volume = {**glucose(250, patient=ref), "meta": {"security": [AI_ASSERTED]},
                 "code": {"text": "Volume of liver (AI segmentation)"}}
    create(fhir_client, ai_volume)
    create(fhir_client, {**condition("C22.0", patient=ref), "meta": {"security": [AI_ASSERTED]}})
    context = build_patient_context(store, ref)
    assert [o.display for o in context.observations] == ["Glucose"]
    assert context.conditions == []

