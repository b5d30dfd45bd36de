"""The report path with the LLM served by a real llama.cpp server: a FHIR record in, a DiagnosticReport
out, drafted by SmolLM2 over HTTP. (Its in-process twin is tests/test_demo_llm_end_to_end.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from tests.conftest import demo_clinical_report, stack_settings
from tests.knowledge.generation.conftest import SERVED_MODEL, SERVER_CONTEXT


async def test_served_llm_drafts_the_clinical_report(tmp_path: Path, small_kb_path: Path, llama_server: str) -> None:
    shutil.copytree(small_kb_path, tmp_path / "var" / "chroma")
    settings = stack_settings(
        tmp_path, workers="clinical,reports", llm_base_url=llama_server, llm_model=SERVED_MODEL,
        llm_context_tokens=SERVER_CONTEXT, llm_max_new_tokens=64, llm_concurrency=2,
    )
    runtime, report, detail = await demo_clinical_report(settings, within=180)
    DiagnosticReport.model_validate(report)
    assert detail["model_name"] == SERVED_MODEL
    assert len(report["conclusion"].split()) >= 3, "the served model wrote an impression"
    assert detail["evidence"], "the passages it was given are listed"
    assert runtime.store.dead_letters() == []
