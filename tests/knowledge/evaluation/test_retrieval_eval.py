"""The retrieval evaluation the `medbridge eval` command calls, on a handful of reports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from knowledge.evaluation.openi import OpenIReport, load_reports, reports_archive
from knowledge.evaluation.retrieval import retrieval_recall_at_k

REPORTS = [
    OpenIReport(report_id=1, findings="Large left pleural effusion with blunting of the costophrenic angle.",
                impression="Left pleural effusion.", mesh=("Pleural Effusion/left/large",)),
    OpenIReport(report_id=2, findings="Small right pleural effusion, costophrenic angle blunted.",
                impression="Right effusion.", mesh=("Pleural Effusion/right/small",)),
    OpenIReport(report_id=3, findings="The heart is enlarged; cardiothoracic ratio increased.",
                impression="Cardiomegaly.", mesh=("Cardiomegaly/severe",)),
    OpenIReport(report_id=4, findings="Enlarged heart size, cardiac silhouette is enlarged.",
                impression="Stable cardiomegaly.", mesh=("Cardiomegaly",)),
    OpenIReport(report_id=5, findings="", impression="No acute disease.", mesh=("normal",)),
]


def test_recall_at_1_finds_the_report_with_the_same_label(tmp_path: Path) -> None:
    scores = retrieval_recall_at_k(REPORTS, k=1, kb_path=tmp_path / "kb")
    assert set(scores) == {"bm25", "dense", "fused"}
    assert scores == {"bm25": 1.0, "dense": 1.0, "fused": 1.0}
    with pytest.raises(ValueError):
        retrieval_recall_at_k(REPORTS[4:], k=5)


def test_vectors_embedded_once_by_the_caller_give_the_same_recall(tmp_path: Path) -> None:
    """``medbridge eval`` embeds the reports once and hands the vectors to this section and the drafting index."""
    from knowledge.embedding import SentenceEmbedder
    from knowledge.evaluation.retrieval import report_passage

    vectors = SentenceEmbedder().embed([report_passage(r).embedding_text() for r in REPORTS])
    given = retrieval_recall_at_k(REPORTS, k=1, kb_path=tmp_path / "kb",
                                  vectors={r.uid: v for r, v in zip(REPORTS, vectors, strict=True)})
    assert given == {"bm25": 1.0, "dense": 1.0, "fused": 1.0}
    # the vectors given are the ones searched: swapped between the effusion and the cardiomegaly reports, dense
    # retrieval finds the wrong reports while BM25 (no vectors) is unchanged
    swapped = dict(zip([r.uid for r in REPORTS], vectors[[2, 3, 0, 1, 4]], strict=True))
    wrong = retrieval_recall_at_k(REPORTS, k=1, kb_path=tmp_path / "kb-swapped", vectors=swapped)
    assert wrong["bm25"] == 1.0 and wrong["dense"] < 0.5
    with pytest.raises(ValueError, match="one embedding per passage"):
        from knowledge.store import KnowledgeBase

        KnowledgeBase(tmp_path / "kb2").add([report_passage(REPORTS[0])], [])


def test_labels_are_the_main_mesh_terms_without_qualifiers() -> None:
    report = OpenIReport(report_id=7, findings="f", impression="i",
                         mesh=("Opacity/lung/base/left", "Pulmonary Atelectasis/base", "No Indexing"))
    assert report.uid == "CXR7" and report.labels == {"opacity", "pulmonary atelectasis"}


def test_the_caller_chooses_which_openi_reports_to_keep() -> None:
    assert reports_archive().name == "NLMCXR_reports.tgz"  # shipped with torchxrayvision
    any_text = load_reports(keep="any text")
    both = load_reports(keep="findings and impression")
    assert 3900 < len(any_text) <= 3955 and len(both) == 3419  # the populations BENCHMARKS.md states
    assert {r.report_id for r in both} < {r.report_id for r in any_text}
    assert [r.report_id for r in both] == sorted(r.report_id for r in both)
    # the de-identification mask is gone (but for 3 glued to a number or word: "4XXXX", "XXXXPM")
    assert not any(re.search(r"\bXXXX\b", r.findings + r.impression) for r in any_text)
