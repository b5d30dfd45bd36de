"""Hybrid retrieval: BM25 and dense rankings fused by reciprocal rank fusion, on a real Chroma."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.retrieval.fusion import reciprocal_rank_fusion
from knowledge.store import KnowledgeBase, Passage

TOY = [
    ("t:effusion", "Pleural effusion", "Blunting of the costophrenic angle suggests a small pleural effusion."),
    ("t:pneumothorax", "Pneumothorax", "A visceral pleural line without lung markings beyond it is a pneumothorax."),
    ("t:cardiomegaly", "Cardiomegaly", "A cardiothoracic ratio above 0.5 on a PA film indicates cardiomegaly."),
    ("t:sglt2", "Empagliflozin", "Empagliflozin lowers glucose and reduces heart failure admissions."),
    ("t:ferritin", "Iron deficiency", "Ferritin below 30 ng/mL suggests iron deficiency anaemia."),
    ("t:granuloma", "Calcified granuloma", "A small dense calcified nodule is usually an old healed granuloma."),
]


@pytest.fixture(scope="module")
def toy_kb(tmp_path_factory: pytest.TempPathFactory) -> KnowledgeBase:
    kb = KnowledgeBase(tmp_path_factory.mktemp("toy-kb"))
    source = {"t:sglt2": "drugs", "t:ferritin": "drugs"}
    kb.add([Passage(id=i, source=source.get(i, "imaging"), title=t, text=x) for i, t, x in TOY])
    return kb


def test_rrf_ranks_ids_found_by_both_retrievers_first() -> None:
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]])
    assert [pid for pid, _ in fused] == ["a", "c", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    # Equal scores keep first-seen order; a repeated id counts once per ranking.
    assert [pid for pid, _ in reciprocal_rank_fusion([["x", "x"], ["y"]])] == ["x", "y"]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], k=0)


def test_query_is_the_rrf_of_the_dense_and_bm25_rankings(toy_kb: KnowledgeBase) -> None:
    text = "pleural line and costophrenic angle on the chest film"
    dense = [p.id for p in toy_kb.dense_query(text, 4)]
    lexical = [pid for pid, _ in toy_kb.lexical_ranking(text, 4)]
    assert dense and lexical
    hits = toy_kb.query(text, 4)
    assert [h.id for h in hits] == [pid for pid, _ in reciprocal_rank_fusion([dense, lexical])][:4]
    assert all(0.0 <= h.score <= 1.0 for h in hits)


def test_a_rare_term_only_bm25_matches_reaches_the_fused_list(toy_kb: KnowledgeBase) -> None:
    lexical = [pid for pid, _ in toy_kb.lexical_ranking("empagliflozin", 3)]
    assert lexical == ["t:sglt2"]
    hits = toy_kb.query("empagliflozin", 3)
    assert "t:sglt2" in [h.id for h in hits]
    # Its score is still its cosine similarity to the query, whichever retriever found it.
    assert next(h for h in hits if h.id == "t:sglt2").score > 0


def test_source_filter_applies_to_both_retrievers(toy_kb: KnowledgeBase) -> None:
    hits = toy_kb.query("iron ferritin heart failure glucose nodule", 5, source="drugs")
    assert {h.id for h in hits} == {"t:sglt2", "t:ferritin"}


def test_bm25_follows_writes_made_through_another_handle(toy_kb: KnowledgeBase) -> None:
    other = KnowledgeBase(Path(toy_kb.location))
    azygos = Passage(id="t:new", source="imaging", title="Azygos lobe", text="An azygos fissure is a normal variant.")
    other.add([azygos])
    try:
        assert [pid for pid, _ in toy_kb.lexical_ranking("azygos fissure", 2)] == ["t:new"]
    finally:
        other.delete(["t:new"])
    assert toy_kb.lexical_ranking("azygos fissure", 2) == []


def test_search_ef_is_stored_with_the_collection(toy_kb: KnowledgeBase) -> None:
    toy_kb.set_search_ef(321)
    assert toy_kb.hnsw_configuration()["ef_search"] == 321
    assert toy_kb.query("pneumothorax", 1)[0].id == "t:pneumothorax"
    assert KnowledgeBase(Path(toy_kb.location)).hnsw_configuration()["ef_search"] == 321
