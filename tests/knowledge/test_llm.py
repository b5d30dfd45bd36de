from __future__ import annotations

import time
from pathlib import Path

import pytest

from knowledge.generation.protocol import LLMNotFoundError, PromptTooLongError
from knowledge.generation.transformers_backend import load_text_generator
from knowledge.testing import build_tiny_random_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_random_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_tiny_llama_generates_deterministically(tiny_path: Path, tmp_path: Path) -> None:
    gen = load_text_generator(tiny_path, tmp_path, device="cpu")
    assert gen.has_chat_template and gen.context_length == 2048
    messages = [{"role": "user", "content": "Patient: 58-year-old male with type 2 diabetes."}]
    first = gen.generate(messages, 12)  # type: ignore[arg-type]
    assert first and first == gen.generate(messages, 12)  # type: ignore[arg-type]
    assert gen.count_prompt_tokens(messages) > gen.count_tokens(messages[0]["content"])  # type: ignore[arg-type]


def test_prompt_beyond_the_context_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    gen = load_text_generator(tiny_path, tmp_path, device="cpu", max_context_tokens=64)
    with pytest.raises(PromptTooLongError):
        gen.generate("diabetes " * 100, 8)


def test_completion_prompt_is_used_without_a_chat_template(tiny_path: Path, tmp_path: Path) -> None:
    gen = load_text_generator(tiny_path, tmp_path, device="cpu")
    gen.has_chat_template = False  # as for Meditron-7B, a pretrained Llama-2
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = gen.render(messages)  # type: ignore[arg-type]
    assert rendered == "Be brief.\n\nHi\n\nAnswer:"
    gen.has_chat_template = True
    assert gen.render(messages) != rendered  # type: ignore[arg-type]  # the tokenizer has a template of its own
    gen.has_chat_template = False
    # the model is conditioned on exactly that text (with the tokenizer's BOS), so it continues it alike
    assert gen.count_prompt_tokens(messages) == gen.count_prompt_tokens(rendered)  # type: ignore[arg-type]
    answer = gen.generate(messages, 5)  # type: ignore[arg-type]
    assert isinstance(answer, str) and answer == gen.generate(rendered, 5)


def test_missing_model_folder_tells_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(LLMNotFoundError, match="MEDBRIDGE_LLM_MODEL"):
        load_text_generator(tmp_path / "meditron-7b", tmp_path)


def test_default_demo_model_answers_a_simple_question(llm_cache_dir: Path) -> None:
    # One thread: the test box has 2 shared cores (see load_text_generator's num_threads).
    gen = load_text_generator(None, llm_cache_dir, device="cpu", num_threads=1)
    assert gen.model_name == "SmolLM2-135M-Instruct" and gen.has_chat_template
    assert (llm_cache_dir / "smollm2-135m-instruct" / "config.json").is_file()
    started = time.perf_counter()
    reloaded = load_text_generator(None, llm_cache_dir, device="cpu")
    assert time.perf_counter() - started < 30  # the cached plain copy, not a second conversion
    answer = reloaded.generate([{"role": "user", "content": "What is the capital of France?"}], 20)
    assert "paris" in answer.lower()
