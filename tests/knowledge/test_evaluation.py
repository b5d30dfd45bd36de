"""``medbridge eval`` on a 3-report subset of the real Open-i reports with the real SmolLM2 and MiniLM, and
the metrics it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.app.cli import main
from knowledge.evaluation.drafting import mesh_labels, micro_f1, rouge_l, split_subset, text_findings
from knowledge.evaluation.openi import OpenIReport, load_reports


def test_rouge_l_and_finding_extraction() -> None:
    assert rouge_l("no acute cardiopulmonary abnormality", "No acute cardiopulmonary abnormality.") == 1.0
    assert rouge_l("left effusion", "small left pleural effusion") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l("", "anything") == 0.0
    assert text_findings("No pneumothorax or pleural effusion. Mild cardiomegaly.") == {"cardiomegaly"}
    assert text_findings("No acute cardiopulmonary abnormality.") == {"normal"}
    report = OpenIReport(report_id=1, findings="f", impression="i", mesh=("Pulmonary Atelectasis/base", "Nodule"))
    assert mesh_labels(report) == {"atelectasis", "nodule"}
    assert micro_f1([{"atelectasis"}], [{"atelectasis", "nodule"}]) == pytest.approx(2 / 3)


def test_the_subset_is_fixed_and_outside_the_knowledge_base() -> None:
    reports = load_reports(keep="findings and impression")
    assert len(reports) > 3000  # the Open-i reports with both findings and an impression
    subset, kb = split_subset(reports, 3)
    again, _ = split_subset(reports, 200)
    assert [r.report_id for r in subset] == [r.report_id for r in again[:3]] and len(again) == 200
    assert not {r.report_id for r in again} & {r.report_id for r in kb}


def test_eval_prints_the_drafting_table(
    tmp_path: Path, llm_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.md"
    assert main(["eval", "--retrieval-queries", "0", "--limit", "3", "--kb-limit", "20", "--max-new-tokens", "8",
                 "--models-dir", str(llm_cache_dir), "--cache-dir", str(tmp_path / "vectors"),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == out.read_text(encoding="utf-8").strip()
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    baseline = next(v for k, v in rows.items() if k.startswith("Baseline"))
    model = next(v for k, v in rows.items() if k.startswith("SmolLM2"))
    assert "| 3 |" in baseline and "| 3 |" in model
    cells = [c.strip() for c in model.split("|")[1:-1]]
    grounded_valid = cells[5]
    assert grounded_valid in ("100.0%", "—")  # after grounding every [n] points at a passage given
    assert "medbridge eval --limit 3" in printed
