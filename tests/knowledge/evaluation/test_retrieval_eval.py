"""The retrieval evaluation the `medbridge eval` command calls, on a handful of reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.evaluation.openi import RadiologyReport, openi_reports_path
from knowledge.evaluation.retrieval import retrieval_recall_at_k

REPORTS = [
    RadiologyReport(uid="CXR1", findings="Large left pleural effusion with blunting of the costophrenic angle.",
                    impression="Left pleural effusion.", labels=frozenset({"pleural effusion"})),
    RadiologyReport(uid="CXR2", findings="Small right pleural effusion, costophrenic angle blunted.",
                    impression="Right effusion.", labels=frozenset({"pleural effusion"})),
    RadiologyReport(uid="CXR3", findings="The heart is enlarged; cardiothoracic ratio increased.",
                    impression="Cardiomegaly.", labels=frozenset({"cardiomegaly"})),
    RadiologyReport(uid="CXR4", findings="Enlarged heart size, cardiac silhouette is enlarged.",
                    impression="Stable cardiomegaly.", labels=frozenset({"cardiomegaly"})),
    RadiologyReport(uid="CXR5", findings="", impression="No acute disease.", labels=frozenset({"normal"})),
]


def test_recall_at_1_finds_the_report_with_the_same_label(tmp_path: Path) -> None:
    scores = retrieval_recall_at_k(REPORTS, k=1, kb_path=tmp_path / "kb")
    assert set(scores) == {"bm25", "dense", "fused"}
    assert scores == {"bm25": 1.0, "dense": 1.0, "fused": 1.0}
    with pytest.raises(ValueError):
        retrieval_recall_at_k(REPORTS[4:], k=5)


def test_the_openi_reports_ship_with_torchxrayvision() -> None:
    assert openi_reports_path().name == "NLMCXR_reports.tgz"
