from __future__ import annotations

from pathlib import Path

import pytest

from inference.clinical.operator import (
    EMPTY_OUTPUT_TEXT,
    ClinicalImpressionOperator,
    ClinicalOperatorError,
    parse_citations,
    patient_facts,
)
from knowledge.generation.transformers_backend import TransformersGenerator, load_text_generator
from knowledge.store import SOURCE_ICD10CM, KnowledgeBase, RetrievedPassage
from schemas.clinical import CodedItem, PatientContext


class _FixedOutput(TransformersGenerator):
    """The real tiny model and tokenizer, with a chosen answer: tests citation handling end to end."""

    def __init__(self, base: TransformersGenerator, answer: str) -> None:
        super().__init__(base.model, base.tokenizer, model_name="fixed", context_length=base.context_length)
        self.answer = answer

    def generate(self, prompt, max_new_tokens):  # type: ignore[no-untyped-def, override]
        assert self.count_prompt_tokens(prompt) + max_new_tokens <= self.context_length
        return self.answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Consistent with diabetes [1].", {1}),
        ("See [2,3] and [1][4].", {1, 2, 3, 4}),
        ("Ranges [2-4]; spaced [ 1 , 3 ].", {1, 2, 3, 4}),
        ("Out of range [9] and [0], not numbers [a], years (2024).", set()),
        ("No citations at all.", set()),
    ],
)
def test_parse_citations(text: str, expected: set[int]) -> None:
    assert parse_citations(text, n_passages=5) == expected


def test_operator_returns_an_impression_with_evidence_within_the_context(
    small_kb: KnowledgeBase, tiny_llm: TransformersGenerator, diabetes_ctx: PatientContext
) -> None:
    op = ClinicalImpressionOperator(small_kb, tiny_llm, k=6, max_new_tokens=32)
    prepared = op.prepare(diabetes_ctx)
    assert prepared.prompt_tokens + 32 <= tiny_llm.context_length
    result = op.run(diabetes_ctx)
    assert result.impression.strip()
    assert result.model_name == tiny_llm.model_name
    assert 0 < len(result.evidence) <= 6
    assert [e.passage_id for e in result.evidence] == [p.id for p in prepared.passages]
    assert any(e.code and e.code.startswith("E11") for e in result.evidence)
    # Random text cites nothing it could mean; conclusion codes then come only from the record.
    for code, _display in result.conclusion_codes:
        assert code == "E11.9"


def test_prompt_holds_only_deidentified_facts(
    small_kb: KnowledgeBase, tiny_llm: TransformersGenerator, diabetes_ctx: PatientContext
) -> None:
    op = ClinicalImpressionOperator(small_kb, tiny_llm)
    prepared = op.prepare(diabetes_ctx)
    prompt = "\n".join(m["content"] for m in prepared.messages)
    assert "58-year-old female" in prompt and "Hemoglobin A1c: 8.2 % (high)" in prompt
    for forbidden in ("Patient/", "pt-0042", "Condition/", "Observation/", "MedicationRequest/", "2025-03-14"):
        assert forbidden not in prompt


def test_very_old_age_is_grouped() -> None:
    ctx = PatientContext(patient_ref="Patient/x", age_years=97, sex="male", conditions=[CodedItem(display="Anemia")])
    facts = patient_facts(ctx)
    assert "97" not in facts and "90 or older" in facts


def test_passages_are_dropped_and_truncated_to_fit_a_small_context(
    tiny_llm_path: Path, tmp_path: Path, small_kb: KnowledgeBase, diabetes_ctx: PatientContext
) -> None:
    llm = load_text_generator(tiny_llm_path, tmp_path, device="cpu", max_context_tokens=512)
    op = ClinicalImpressionOperator(small_kb, llm, k=30, max_new_tokens=32)
    many = small_kb.query("diabetes kidney lung nodule anaemia", k=30)
    assert len(many) == 30
    prepared = op.fit_passages(diabetes_ctx, many)
    assert prepared.prompt_tokens <= op.prompt_budget
    assert 1 <= len(prepared.passages) < 30
    assert prepared.passages_dropped == 30 - len(prepared.passages)
    # The highest-ranked passages are the ones kept, in order.
    assert [p.id for p in prepared.passages] == [p.id for p in many[: len(prepared.passages)]]

    # A single passage far longer than the budget is cut, not dropped.
    huge = RetrievedPassage(id="big", source="test", title="Long", text="glucose level " * 400, score=0.9)
    cut = op.fit_passages(diabetes_ctx, [huge])
    assert cut.prompt_tokens <= op.prompt_budget
    assert [p.id for p in cut.passages] == ["big"] and cut.passages[0].text.endswith("...")
    assert len(cut.passages[0].text) < len(huge.text)

    result = op.run(diabetes_ctx)
    assert result.prompt_tokens + 32 <= llm.context_length


def test_patient_facts_alone_overflowing_is_an_error(
    tiny_llm_path: Path, tmp_path: Path, small_kb: KnowledgeBase, diabetes_ctx: PatientContext
) -> None:
    llm = load_text_generator(tiny_llm_path, tmp_path, device="cpu", max_context_tokens=256)
    op = ClinicalImpressionOperator(small_kb, llm, max_new_tokens=200)
    with pytest.raises(ClinicalOperatorError, match="prompt budget"):
        op.prepare(diabetes_ctx)


def test_cited_passages_are_marked_and_give_conclusion_codes(
    small_kb: KnowledgeBase, tiny_llm: TransformersGenerator, diabetes_ctx: PatientContext
) -> None:
    probe = ClinicalImpressionOperator(small_kb, tiny_llm).prepare(diabetes_ctx)
    icd_numbers = [i for i, p in enumerate(probe.passages, 1) if p.source == SOURCE_ICD10CM]
    assert icd_numbers
    n = icd_numbers[0]
    llm = _FixedOutput(tiny_llm, f"Poorly controlled type 2 diabetes [{n}].")
    result = ClinicalImpressionOperator(small_kb, llm).run(diabetes_ctx)
    assert [i for i, e in enumerate(result.evidence, 1) if e.cited] == [n]
    cited = result.evidence[n - 1]
    assert result.conclusion_codes == [(cited.code, cited.title)]
    assert result.generated


def test_empty_model_output_gives_an_honest_fallback(
    small_kb: KnowledgeBase, tiny_llm: TransformersGenerator, diabetes_ctx: PatientContext
) -> None:
    result = ClinicalImpressionOperator(small_kb, _FixedOutput(tiny_llm, "   ")).run(diabetes_ctx)
    assert result.impression == EMPTY_OUTPUT_TEXT and not result.generated
    assert result.evidence and not any(e.cited for e in result.evidence)


def test_record_without_clinical_content_does_not_call_the_model(
    small_kb: KnowledgeBase, tiny_llm: TransformersGenerator
) -> None:
    result = ClinicalImpressionOperator(small_kb, _FixedOutput(tiny_llm, "should not appear")).run(
        PatientContext(patient_ref="Patient/empty", age_years=40, sex="male")
    )
    assert not result.generated and result.evidence == [] and "no impression" in result.impression


def test_demo_model_end_to_end(small_kb: KnowledgeBase, llm_cache_dir: Path, diabetes_ctx: PatientContext) -> None:
    # One thread: the test box has 2 cores shared with other processes, where two OpenMP threads
    # slow generation tenfold.
    llm = load_text_generator(None, llm_cache_dir, device="cpu", num_threads=1)
    result = ClinicalImpressionOperator(small_kb, llm, k=4, max_new_tokens=32).run(diabetes_ctx)
    # The 135M demo model often cites nothing: its draft is then stated plainly as unsupported, never
    # passed off as an impression; every sentence it drafted is kept, marked, in the grounding.
    assert result.grounding is not None and result.grounding.sentences
    if result.grounding.supported_count:
        assert result.generated and result.impression.strip()
    else:
        assert not result.generated and result.impression.startswith("No impression:")
    assert result.model_name == "SmolLM2-135M-Instruct"
    assert result.prompt_tokens + 64 <= llm.context_length
    assert result.evidence[0].passage_id == "icd10cm:E11.9"  # the patient's own coded condition
    cited_icd = [(e.code, e.title) for e in result.evidence if e.cited and e.source == SOURCE_ICD10CM]
    if cited_icd:  # a real model may cite; codes then come from what it cited
        assert result.conclusion_codes == cited_icd
    else:
        assert result.conclusion_codes == [("E11.9", "Type 2 diabetes mellitus without complications")]
