"""Choose and open the text generator the configuration names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from knowledge.generation.protocol import TextGenerator


@dataclass(frozen=True)
class GeneratorConfig:
    """What selects and opens a backend (built from the service settings by the worker).

    ``base_url`` empty selects the in-process transformers model (``model`` a local folder, or
    ``None`` for the demo SmolLM2); set, it selects the OpenAI-compatible server, ``model`` being
    the served model's name.
    """

    base_url: str = ""
    model: str | None = None
    api_key: str = ""
    cache_dir: Path = Path(".")
    device: str = "auto"
    concurrency: int = 4
    timeout_seconds: float = 120.0
    max_retries: int = 4
    retry_cap_seconds: float = 8.0
    context_tokens: int = 2048
    tokenizer: Path | None = None


def open_text_generator(config: GeneratorConfig) -> TextGenerator:
    """Open the backend ``config`` names; blocking (a local model loads in seconds).

    Raises:
        LLMNotFoundError: no local model, or a server without a tokenizer and no local one given.
        LLMUnavailableError: the server cannot be reached to find its tokenizer.
        ValueError: a server URL without a model name.
    """
    if not config.base_url:
        from knowledge.generation.transformers_backend import load_text_generator

        return load_text_generator(Path(config.model) if config.model else None, config.cache_dir, config.device)
    if not config.model:
        raise ValueError(
            "MEDBRIDGE_LLM_BASE_URL is set but MEDBRIDGE_LLM_MODEL is not: set it to the served model's name "
            "(e.g. meditron-7b for vLLM, meditron:7b for Ollama)"
        )
    from knowledge.generation.openai_backend import OpenAICompatibleGenerator, RetryPolicy
    from knowledge.generation.server_tokens import LocalTokenizer

    return OpenAICompatibleGenerator(
        base_url=config.base_url,
        model=config.model,
        api_key=config.api_key,
        context_length=config.context_tokens,
        concurrency=config.concurrency,
        timeout_seconds=config.timeout_seconds,
        retry=RetryPolicy(max_retries=config.max_retries, cap_seconds=config.retry_cap_seconds),
        tokenizer=LocalTokenizer(config.tokenizer) if config.tokenizer else None,
    )
