"""The clinical trigger end to end: FHIR writes over HTTP, the debounced record publisher, the real
Kafka-protocol broker, the clinical worker (tiny Llama, real retrieval) and the report writer.

Three quick relevant writes draft one report; an irrelevant write drafts nothing; a later relevant
write drafts a new report that supersedes the first, and the worklist shows one draft for the patient."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from integration.app.runtime import Runtime
from integration.db.tables import OutboxEntry
from knowledge.ingest import icd10cm_passages, note_passages
from knowledge.store import KnowledgeBase
from schemas.events import TOPIC_RECORD_RECEIVED
from tests import authorized
from tests.conftest import stack_settings

DEBOUNCE = 0.5


@pytest.fixture
async def clinical_stack(tmp_path: Path, tiny_llm: Path) -> AsyncIterator[Runtime]:
    """MedBridge with the HTTP edge, the clinical worker and the report writer (no DICOM, no imaging), over a
    small real knowledge base (the notes and two ICD-10-CM categories: seconds to embed, where the shipped
    corpus takes minutes; not empty, so the worker does not seed it)."""
    KnowledgeBase(tmp_path / "var" / "chroma").add([*note_passages(),
                                                    *icd10cm_passages(["N18", "I10"], include_categories=False)])
    runtime = Runtime(stack_settings(tmp_path, llm_model=tiny_llm, workers="clinical,reports", dicom_enabled=False,
                                     record_quiet_seconds=DEBOUNCE))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def until(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.2)
    return result


def announced(runtime: Runtime) -> int:
    with runtime.store.session() as s:
        return s.scalar(select(func.count()).select_from(OutboxEntry).where(OutboxEntry.topic == TOPIC_RECORD_RECEIVED))


async def test_relevant_writes_draft_one_report_and_a_later_change_supersedes_it(clinical_stack: Runtime) -> None:
    base = f"http://127.0.0.1:{clinical_stack.settings.http_port}"
    async with authorized.AsyncClient(base_url=base, timeout=30) as client:
        async def create(resource: dict[str, Any]) -> dict[str, Any]:
            r = await client.post(f"/fhir/{resource['resourceType']}", json=resource)
            assert r.status_code == 201, r.text
            return r.json()

        async def reports() -> list[dict[str, Any]]:
            bundle = (await client.get("/fhir/DiagnosticReport", params={"subject": ref})).json()
            return [e["resource"] for e in bundle.get("entry", [])]

        patient = await create({"resourceType": "Patient", "gender": "male", "birthDate": "1961-04-02"})
        ref = f"Patient/{patient['id']}"
        subject = {"reference": ref}
        # three relevant writes in quick succession: one draft
        await create({"resourceType": "Condition", "subject": subject,
                      "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "N18.3",
                                           "display": "Chronic kidney disease, stage 3"}]}})
        await create({"resourceType": "Observation", "status": "final", "subject": subject,
                      "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Creatinine"}]},
                      "valueQuantity": {"value": 2.1, "unit": "mg/dL", "code": "mg/dL"},
                      "referenceRange": [{"high": {"value": 1.3, "code": "mg/dL"}}]})
        await create({"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": subject,
                      "medicationCodeableConcept": {"text": "lisinopril 10 mg"}})
        (first,) = await until("the first draft", reports)
        assert first["status"] == "preliminary"

        # an irrelevant write (an address): nothing announced, nothing drafted, well past the debounce
        moved = {**patient, "address": [{"city": "Grenoble"}]}
        assert (await client.put(f"/fhir/Patient/{patient['id']}", json=moved)).status_code == 200
        await asyncio.sleep(DEBOUNCE * 4)
        assert announced(clinical_stack) == 1 and len(await reports()) == 1

        # a relevant change later: a new draft that supersedes the first
        await create({"resourceType": "Condition", "subject": subject,
                      "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10",
                                           "display": "Essential (primary) hypertension"}]}})

        async def two() -> list[dict[str, Any]] | None:
            found = await reports()
            return found if len(found) == 2 and {r["status"] for r in found} == {"cancelled", "preliminary"} else None

        found = await until("the second draft superseding the first", two)
        by_status = {r["status"]: r for r in found}
        assert by_status["cancelled"]["id"] == first["id"]
        newer = by_status["preliminary"]["id"]
        items = (await client.get("/api/worklist", params={"kind": "clinical", "patient": ref})).json()["items"]
        assert [i["report_id"] for i in items] == [newer]
