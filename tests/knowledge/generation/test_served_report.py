"""The report path with the LLM served by a real llama.cpp server: a FHIR record in, a DiagnosticReport
out, drafted by SmolLM2 over HTTP. (Its in-process twin is tests/test_demo_llm_end_to_end.py.)"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from integration.app.demo import demo_bundle
from integration.app.runtime import Runtime
from tests import authorized
from tests.conftest import stack_settings
from tests.knowledge.generation.conftest import SERVED_MODEL, SERVER_CONTEXT


async def test_served_llm_drafts_the_clinical_report(tmp_path: Path, small_kb_path: Path, llama_server: str) -> None:
    shutil.copytree(small_kb_path, tmp_path / "var" / "chroma")
    settings = stack_settings(
        tmp_path, workers="clinical,reports", llm_base_url=llama_server, llm_model=SERVED_MODEL,
        llm_context_tokens=SERVER_CONTEXT, llm_max_new_tokens=64, llm_concurrency=2,
    )
    runtime = Runtime(settings)
    await runtime.start()
    try:
        async with authorized.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as client:
            r = await client.post("/fhir", json=demo_bundle())
            assert r.status_code == 200, r.text
            patient = r.json()["entry"][0]["response"]["location"].split("/_history")[0]
            deadline = time.monotonic() + 180
            while not (bundle := (await client.get("/fhir/DiagnosticReport", params={"subject": patient})).json()).get(
                "entry"
            ):
                assert time.monotonic() < deadline, "no clinical report within 180 s"
                await asyncio.sleep(0.5)
            report = bundle["entry"][0]["resource"]
            detail = (await client.get(f"/api/reports/{report['id']}")).json()
    finally:
        await runtime.stop()
    DiagnosticReport.model_validate(report)
    assert detail["model_name"] == SERVED_MODEL
    assert len(report["conclusion"].split()) >= 3, "the served model wrote an impression"
    assert detail["evidence"], "the passages it was given are listed"
    assert runtime.store.dead_letters() == []
