"""What the clinical operator needs from a language model, whatever serves it.

Two backends implement :class:`TextGenerator`: an in-process transformers model
(:mod:`knowledge.generation.transformers_backend`) and any OpenAI-compatible HTTP server (vLLM, TGI's
Messages API, llama.cpp's server, Ollama, FastChat; :mod:`knowledge.generation.openai_backend`).
:func:`knowledge.generation.backends.open_text_generator` picks one from the configuration.

The error classes say what a caller should do: :class:`LLMUnavailableError` will pass (retry later),
:class:`LLMInvalidResponseError` and :class:`PromptTooLongError` will not (the same request fails again).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from typing_extensions import TypedDict  # pydantic needs this TypedDict on Python < 3.12


class LLMError(Exception):
    """Base class for errors of the language-model layer."""


class LLMNotFoundError(LLMError):
    """The configured model (a local folder, the demo package, or a server's tokenizer) cannot be used;
    raised at start-up, with what to set."""


class PromptTooLongError(LLMError):
    """The prompt plus the requested new tokens do not fit in the model's context window."""


class LLMUnavailableError(LLMError):
    """The model server is down, slow, overloaded (429, 5xx) or refuses our credentials, after the
    backend's own retries: the same request may succeed later."""


class LLMInvalidResponseError(LLMError):
    """The server answered, but not with a completion (a body that is not an OpenAI response, no
    choices, no text) or rejected this request as malformed (400, 422): sending it again will not help."""


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


Prompt = str | Sequence[ChatMessage]


def ensure_offline() -> None:
    """Forbid hub downloads unless the operator explicitly allowed them.

    Must run before transformers / sentence-transformers are imported: they read these
    variables at import time.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@runtime_checkable
class TextGenerator(Protocol):
    """A language model the operator can budget a prompt for and ask for a completion.

    Attributes:
        model_name: recorded with every result.
        context_length: tokens (prompt + new tokens) a request may use.
        max_concurrency: generations worth running at once: 1 for an in-process model (one
            forward at a time), the configured limit for a server that batches requests.
    """

    model_name: str
    context_length: int
    max_concurrency: int

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` on its own, as the model's tokenizer splits it."""
        ...

    def truncate_to_tokens(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` of at most ``max_tokens`` tokens (approximately on merges)."""
        ...

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens the model will see for ``prompt`` after templating; never less than the real count."""
        ...

    def generate(self, prompt: Prompt, max_new_tokens: int) -> str:
        """Greedy continuation of ``prompt`` (only the new text, stripped). Blocking; safe to call from
        up to ``max_concurrency`` threads at once.

        Raises:
            PromptTooLongError, LLMUnavailableError, LLMInvalidResponseError; ValueError when
            ``max_new_tokens`` < 1.
        """
        ...

    def close(self) -> None:
        """Release connections or memory; the generator is not used afterwards."""
        ...


@runtime_checkable
class BatchTextGenerator(TextGenerator, Protocol):
    """A generator that also drafts several prompts in one pass (an in-process model: one forward per token for
    the whole batch instead of one per prompt, which is what the per-token overhead of a small model costs)."""

    def generate_batch(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """``[generate(p, max_new_tokens) for p in prompts]``, computed together; the texts equal the one-at-a-time
        ones up to floating-point ties (tests/knowledge/generation checks equality on real prompts).

        Raises:
            as ``generate``.
        """
        ...
