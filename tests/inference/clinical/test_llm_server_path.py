"""The clinical path with the LLM behind an OpenAI-compatible server, as `medbridge run` starts it with
MEDBRIDGE_LLM_BASE_URL: a garbage answer dead-letters the record with the reason, a server that is
down pauses the worker (nothing lost, nothing dead-lettered) and the record is reported once it is back.
The same path against the real llama.cpp server is in tests/knowledge/generation/test_served_report.py."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from integration.app.demo import demo_bundle
from integration.app.runtime import Runtime
from knowledge.ingest import icd10cm_passages, note_passages
from knowledge.store import KnowledgeBase
from tests import authorized
from tests.conftest import stack_settings
from tests.knowledge.generation.misbehaving_server import Behaviour, misbehaving_server


@pytest.fixture(scope="module")
def notes_kb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's notes and the diabetes ICD-10-CM leaves: seconds to embed, unlike the full corpus."""
    path = tmp_path_factory.mktemp("kb-notes")
    KnowledgeBase(path).add([*note_passages(), *icd10cm_passages(["E11"], include_categories=False)])
    return path


async def _post_patient(client: authorized.AsyncClient) -> str:
    r = await client.post("/fhir", json=demo_bundle())
    assert r.status_code == 200, r.text
    return str(r.json()["entry"][0]["response"]["location"].split("/_history")[0])


async def _wait(predicate, what: str, timeout: float = 90) -> None:  # noqa: ANN001 - Callable[[], Awaitable[bool]]
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        await asyncio.sleep(0.2)


async def test_garbage_is_dead_lettered_and_a_down_server_pauses_until_it_is_back(
    tmp_path: Path, notes_kb_path: Path
) -> None:
    shutil.copytree(notes_kb_path, tmp_path / "var" / "chroma")
    behaviour = Behaviour(mode="garbage-json")
    with misbehaving_server(behaviour) as url:
        settings = stack_settings(
            tmp_path, workers="clinical,reports", llm_base_url=url, llm_model="meditron-7b",
            llm_max_retries=1, llm_timeout_seconds=5, llm_concurrency=2, llm_max_new_tokens=64,
            inference_processes=False,  # the test reads the clinical worker's state in this process
        )
        runtime = Runtime(settings)
        await runtime.start()
        worker = runtime.workers["clinical_worker"]
        try:
            async with authorized.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as client:
                await _post_patient(client)

                async def dead_lettered() -> bool:
                    return bool(runtime.store.dead_letters())

                await _wait(dead_lettered, "the garbage answer's dead letter")
                (letter,) = runtime.store.dead_letters()
                assert "answer was unusable" in letter.error and "choices" in letter.error

                behaviour.mode, behaviour.status = "status", 503  # the server goes down
                patient = await _post_patient(client)

                async def paused() -> bool:
                    return worker.consumer.paused_since is not None

                await _wait(paused, "the clinical worker's pause")
                assert len(runtime.store.dead_letters()) == 1 and worker.running()

                behaviour.mode = "ok"  # back: the paused record is drafted and reported

                async def reported() -> bool:
                    r = await client.get("/fhir/DiagnosticReport", params={"subject": patient})
                    return bool(r.json().get("entry"))

                await _wait(reported, "the report after the server came back")
                bundle = (await client.get("/fhir/DiagnosticReport", params={"subject": patient})).json()
        finally:
            await runtime.stop()
    report = bundle["entry"][0]["resource"]
    DiagnosticReport.model_validate(report)
    assert report["conclusion"].startswith(behaviour.answer.split("[")[0].strip())
    assert len(runtime.store.dead_letters()) == 1
