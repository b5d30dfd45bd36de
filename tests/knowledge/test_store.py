from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.ingest import default_corpus, ingest_default_corpus, note_passages
from knowledge.store import SOURCE_ICD10CM, SOURCE_NOTES, KnowledgeBase, KnowledgeBaseError, Passage


def test_default_corpus_has_stable_unique_ids_and_icd_text() -> None:
    first, second = default_corpus(), default_corpus()
    assert [p.id for p in first] == [p.id for p in second]
    assert len({p.id for p in first}) == len(first)
    e119 = next(p for p in first if p.id == "icd10cm:E11.9")
    assert e119.source == SOURCE_ICD10CM and e119.code == "E11.9"
    assert e119.text.startswith("ICD-10-CM E11.9: Type 2 diabetes mellitus without complications.")
    assert "Parent: E11 Type 2 diabetes mellitus" in e119.text


def test_notes_are_split_into_titled_passages() -> None:
    notes = note_passages()
    stems = {p.id.split(":")[1] for p in notes}
    assert len(stems) >= 10
    assert all(p.source == SOURCE_NOTES and p.title and p.text for p in notes)
    # Every passage stays within the embedding model's window (256 wordpieces, ~1,000 characters).
    assert max(len(p.text) for p in notes) < 1200


def test_ingestion_is_idempotent(ingested_kb: KnowledgeBase) -> None:
    before = ingested_kb.count()
    assert before == len(default_corpus())
    assert ingest_default_corpus(ingested_kb) == 0
    assert ingested_kb.count() == before


def test_reopening_the_same_folder_keeps_the_passages(ingested_kb_path: Path, ingested_kb: KnowledgeBase) -> None:
    reopened = KnowledgeBase(ingested_kb_path)
    assert reopened.count() == ingested_kb.count()
    assert reopened.query("heart failure", k=1)


def _top(kb: KnowledgeBase, text: str, k: int = 5) -> list[str]:
    dense = kb.dense_query(text, k)
    assert [h.score for h in dense] == sorted((h.score for h in dense), reverse=True)
    # The hybrid list is in fused-rank order; each score is still the passage's cosine similarity.
    hits = kb.query(text, k)
    assert len(hits) == k
    assert all(0.0 <= h.score <= 1.0 for h in hits)
    return [h.code or h.id for h in hits]


def test_diabetes_query_finds_e11_or_the_diabetes_note(ingested_kb: KnowledgeBase) -> None:
    top = _top(ingested_kb, "type 2 diabetes with high HbA1c")
    assert any(t.startswith("E11") or t.startswith("note:type-2-diabetes") for t in top), top


def test_lung_nodule_query_finds_r91_or_the_nodule_note(ingested_kb: KnowledgeBase) -> None:
    top = _top(ingested_kb, "solitary lung nodule on chest x-ray")
    assert any(t.startswith("R91") or t.startswith("note:pulmonary-nodule") for t in top), top


def test_add_upserts_changed_text_and_skips_unchanged(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path / "kb")
    p = Passage(id="x:1", source="test", title="Iron", text="Ferritin below 30 ng/mL suggests iron deficiency.")
    assert kb.add([p]) == 1
    assert kb.add([p]) == 0
    changed = p.model_copy(update={"text": "Ferritin below 15 ng/mL is highly specific for iron deficiency."})
    assert kb.add([changed]) == 1
    assert kb.count() == 1
    [hit] = kb.query("iron deficiency ferritin", k=3)
    assert hit.text == changed.text and hit.code is None


def test_query_on_empty_store_or_blank_text_returns_nothing(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path / "kb")
    assert kb.query("anything") == []
    assert kb.query("   ") == []
    with pytest.raises(ValueError):
        kb.query("x", k=0)


def test_missing_embedding_model_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeBaseError, match="embedding model not found"):
        KnowledgeBase(tmp_path / "kb", embedding_model=tmp_path / "no-such-model")


def test_unreachable_chroma_server_is_a_knowledge_base_error(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeBaseError, match="cannot open"):
        KnowledgeBase(chroma_url="http://127.0.0.1:9")
