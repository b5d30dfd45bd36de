"""Grounding of drafted impressions with the real MiniLM model: citations, cut sentences, support."""

from __future__ import annotations

import pytest

from knowledge.embedding import SentenceEmbedder
from knowledge.grounding import (
    REASON_NEGATION,
    REASON_NO_CITATION,
    GroundingChecker,
    no_supported_sentence_text,
    remove_invalid_citations,
    split_sentences,
    trim_cut_sentence,
)

PASSAGES = [
    "ICD-10-CM E11.9: Type 2 diabetes mellitus without complications.",
    "Diabetes diagnosis: a hemoglobin A1c of 6.5% or higher on two occasions indicates diabetes mellitus. "
    "Values between 5.7% and 6.4% indicate prediabetes.",
    "Hypertension stages: stage 2 hypertension is a systolic pressure of 140 mmHg or more or a diastolic "
    "pressure of 90 mmHg or more.",
]


@pytest.fixture(scope="module")
def checker() -> GroundingChecker:
    return GroundingChecker(SentenceEmbedder())


def test_citations_of_passages_never_given_are_removed_and_counted() -> None:
    text, kept, removed = remove_invalid_citations("Diabetes [1][6]. High A1c [2, 9]. Stage [0]. Range [2-4].", 3)
    assert text == "Diabetes [1]. High A1c [2]. Stage. Range [2, 3]."
    assert (kept, removed) == (4, 4)


def test_a_draft_cut_by_the_token_limit_keeps_its_complete_sentences() -> None:
    draft = "A1c of 8.2% indicates diabetes [2]. The patient's condition must be"
    assert trim_cut_sentence(draft, hit_limit=True) == ("A1c of 8.2% indicates diabetes [2].", True)
    # A draft that stopped on its own keeps its last words; decimals do not end a sentence.
    assert trim_cut_sentence(draft, hit_limit=False) == (draft, False)
    assert split_sentences("Nodule of 1.5 cm [1]. Stable.") == (["Nodule of 1.5 cm [1].", "Stable."], "")


def test_a_sentence_is_supported_only_by_a_passage_that_says_it(checker: GroundingChecker) -> None:
    supported, invented, uncited, negated = checker.check(
        [
            "A hemoglobin A1c of 8.2% is above the 6.5% threshold that indicates diabetes mellitus [2].",
            "The patient has chronic kidney disease stage 3 requiring dialysis [2].",
            "Review of treatment is suggested.",
            "Diabetes mellitus is not present [2].",
        ],
        PASSAGES,
    )
    assert supported.supported and supported.cited == [2] and supported.similarity >= 0.45
    assert not invented.supported and invented.reason.startswith("not supported by the cited evidence")
    assert not uncited.supported and uncited.reason == REASON_NO_CITATION
    assert not negated.supported and negated.reason == REASON_NEGATION


def test_ground_cleans_trims_and_marks_a_draft(checker: GroundingChecker) -> None:
    text, grounding = checker.ground(
        "Stage 2 hypertension range [3][7]. Hemoglobin A1c indicates diabetes mellitus [2]. The patient must be",
        PASSAGES,
        hit_limit=True,
    )
    assert text == "Stage 2 hypertension range [3]. Hemoglobin A1c indicates diabetes mellitus [2]."
    assert grounding.citations_removed == 1 and grounding.citations_kept == 2 and grounding.truncated
    assert [s.supported for s in grounding.sentences] == [True, True]


def test_a_draft_with_no_supported_sentence_is_stated_plainly(checker: GroundingChecker) -> None:
    _text, grounding = checker.ground("The kidneys are failing [1]. Start dialysis.", PASSAGES, hit_limit=False)
    assert grounding.supported_count == 0
    statement = no_supported_sentence_text(grounding)
    assert statement.startswith("No impression: None of the 2 sentences the model drafted is supported")
    assert "kidney" not in statement
