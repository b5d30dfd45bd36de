"""A grounded clinical impression reaches the reviewer with its marks: in the stored DiagnosticReport (valid
FHIR, one extension per sentence), in the review API, and as the viewer's plain-text lines."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from integration.db.store import Store
from integration.reports.writer import write_report
from schemas.clinical import SENTENCE_SUPPORT_EXTENSION, UNSUPPORTED_MARK, GroundedSentence, ImpressionGrounding
from schemas.events import ClinicalInferenceCompleted, EvidencePassage
from tests import authorized
from tests.conftest import serve_app, stack_settings
from viewer.clinical_panel import grounding_summary, sentence_marks

SUPPORTED = "A1c of 8.2% indicates diabetes mellitus [1]."
INVENTED = "Chronic kidney disease requires dialysis [1]."


def _event(sentences: list[GroundedSentence], impression: str) -> ClinicalInferenceCompleted:
    return ClinicalInferenceCompleted(
        source_event_id=str(uuid.uuid4()), patient_ref="Patient/p1", revision=1, model_name="SmolLM2",
        impression=impression,
        evidence=[EvidencePassage(passage_id="note:dm", source="notes", title="Diabetes diagnosis",
                                  text="An A1c of 6.5% or higher indicates diabetes mellitus.", score=0.8, cited=True)],
        grounding=ImpressionGrounding(sentences=sentences, citations_kept=2, citations_removed=3, truncated=True),
    )


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_the_report_marks_each_unsupported_sentence(store: Store, tmp_path: Path) -> None:
    event = _event([
        GroundedSentence(text=SUPPORTED, cited=[1], supported=True, similarity=0.82, overlap=1.0),
        GroundedSentence(text=INVENTED, cited=[1], supported=False, similarity=0.2, overlap=0.25,
                         reason=f"{UNSUPPORTED_MARK} (meaning differs from the cited passages)"),
    ], f"{SUPPORTED} {INVENTED}")
    rid = write_report(store, event)
    with serve_app(stack_settings(tmp_path), store) as port:
        resp = authorized.get(f"http://127.0.0.1:{port}/api/reports/{rid}", timeout=30)
    assert resp.status_code == 200, resp.text
    report = resp.json()["fhir"]
    assert report["conclusion"].startswith(f"{SUPPORTED} {INVENTED} ({UNSUPPORTED_MARK})")
    marks = [e for e in report["extension"] if e["url"] == SENTENCE_SUPPORT_EXTENSION]
    assert [next(p["valueBoolean"] for p in m["extension"] if p["url"] == "supported") for m in marks] == [True, False]
    assert sentence_marks(report) == [
        f"✓ supported by [1]: {SUPPORTED}",
        f"⚠ NOT SUPPORTED BY THE CITED EVIDENCE (meaning differs from the cited passages): {INVENTED}",
    ]
    assert "3 citation(s)" in (grounding_summary(report) or "") and "unfinished" in (grounding_summary(report) or "")


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_report_with_no_supported_sentence_concludes_plainly(store: Store) -> None:
    from integration.fhir.storage import get_resource

    statement = "No impression: The one sentence the model drafted is not supported by the passages it cites."
    rid = write_report(store, _event([GroundedSentence(text=INVENTED, cited=[1], supported=False,
                                                        reason=UNSUPPORTED_MARK)], statement))
    report = get_resource(store, "DiagnosticReport", rid)
    assert report["conclusion"].startswith(statement) and INVENTED not in report["conclusion"]
    assert sentence_marks(report) == [f"⚠ {UNSUPPORTED_MARK.upper()}: {INVENTED}"]
