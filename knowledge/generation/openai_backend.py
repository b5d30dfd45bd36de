"""The HTTP backend: any OpenAI-compatible chat-completions server, through the ``openai`` client.

vLLM, TGI's Messages API, llama.cpp's server, Ollama and FastChat all speak this API, so one class
serves Meditron wherever a hospital runs it. What this adds to the bare client:

- a bounded number of requests in flight (``concurrency``): the server batches them, the caller's
  threads wait for a slot instead of flooding it;
- retries with capped, jittered exponential backoff on 429, 5xx, timeouts and refused connections,
  then :class:`LLMUnavailableError` (the event consumer pauses and retries the event later);
- an answer that is not a completion is :class:`LLMInvalidResponseError` (never retried);
- token counting with the server's tokenizer (or a local one), so the context budget holds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httpx
import openai
from openai.types.chat import ChatCompletion

from knowledge.generation.protocol import (
    ChatMessage,
    LLMInvalidResponseError,
    LLMNotFoundError,
    LLMUnavailableError,
    Prompt,
    PromptTooLongError,
)
from knowledge.generation.server_tokens import ServerTokenizer, Tokenizer, server_root

log = logging.getLogger(__name__)

# Chat templates wrap each message in role markers and end-of-turn tokens (Llama-2: [INST] ... [/INST],
# ChatML: <|im_start|>role ... <|im_end|>); a server's template is not visible to the client, so each
# message is charged a generous allowance instead. The contract test checks the estimate never falls
# below what the server reports as prompt_tokens.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_FIXED = 8
# Status codes that say "not now": rate limits, overload, gateway trouble.
_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# Status codes that say "this deployment is misconfigured" (key, model name, URL): every event would
# fail the same way, so they are reported as unavailable and the consumer waits for the fix instead
# of dead-lettering the whole queue.
_CONFIG_STATUS = frozenset({401, 403, 404})


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts after the first, and the exponential backoff between them (first wait, longest wait)."""

    max_retries: int = 4
    base_seconds: float = 0.5
    cap_seconds: float = 8.0

    def delay(self, retry: int) -> float:
        """Full jitter: a uniform wait up to the capped exponential, so workers retrying together spread out."""
        return random.uniform(0, min(self.cap_seconds, self.base_seconds * 2 ** (retry - 1)))


class OpenAICompatibleGenerator:
    """A :class:`~knowledge.generation.protocol.TextGenerator` backed by an OpenAI-compatible server.

    Args:
        base_url: the API root, e.g. ``http://gpu-1:8000/v1``.
        model: the served model's name (``meditron-7b``, ``meditron:7b`` for Ollama).
        api_key: sent as a bearer token; servers without authentication ignore it.
        context_length: the served model's context window (Meditron-7B: 2,048).
        concurrency: requests in flight at most, across all threads using this instance.
        timeout_seconds: per request (connect, read); a slower answer counts as a failed attempt.
        retry: retries of failed attempts before :class:`LLMUnavailableError`.
        tokenizer: counts tokens; ``None`` means the server's tokenizer endpoint.
        sleep: how retries wait (tests pass a recorder).

    Raises:
        LLMNotFoundError: the server has no tokenizer endpoint and no local tokenizer was given.
        LLMUnavailableError: the server cannot be reached to find its tokenizer.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str = "",
        context_length: int = 2048,
        concurrency: int = 4,
        timeout_seconds: float = 120.0,
        retry: RetryPolicy | None = None,
        tokenizer: Tokenizer | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if concurrency < 1 or context_length < 1:
            raise ValueError("concurrency and context_length must be >= 1")
        self.model_name = model
        self.context_length = context_length
        self.max_concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=server_root(base_url), timeout=timeout_seconds, headers=headers)
        # Retries are ours (jittered, capped, counted); the client's own would multiply them.
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or "not-needed",
            timeout=timeout_seconds,
            max_retries=0,
        )
        if tokenizer is None:
            tokenizer = ServerTokenizer.probe(self._http)
        if tokenizer is None:
            self.close()
            raise LLMNotFoundError(
                f"the LLM server at {base_url} has no tokenizer endpoint (/tokenize or /extras/tokenize), "
                "so prompts cannot be fitted to its context; set MEDBRIDGE_LLM_TOKENIZER to a local folder "
                "holding the served model's tokenizer (tokenizer.json and tokenizer_config.json)"
            )
        self._tokenizer = tokenizer

    def close(self) -> None:
        self._client.close()
        self._http.close()

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    def truncate_to_tokens(self, text: str, max_tokens: int) -> str:
        ids = self._tokenizer.encode(text)
        if len(ids) <= max_tokens:
            return text
        return self._tokenizer.decode(ids[: max(max_tokens, 0)])

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        messages = _as_messages(prompt)
        content = sum(self.count_tokens(m["content"]) for m in messages)
        return content + TEMPLATE_TOKENS_PER_MESSAGE * len(messages) + TEMPLATE_TOKENS_FIXED

    def generate(self, prompt: Prompt, max_new_tokens: int) -> str:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        messages = _as_messages(prompt)
        used = self.count_prompt_tokens(messages)
        if used + max_new_tokens > self.context_length:
            raise PromptTooLongError(
                f"prompt of {used} tokens + {max_new_tokens} new tokens exceeds the context window "
                f"of {self.context_length} tokens of {self.model_name} (MEDBRIDGE_LLM_CONTEXT_TOKENS)"
            )
        with self._slots:
            return self._complete_with_retries(messages, max_new_tokens)

    def _complete_with_retries(self, messages: list[ChatMessage], max_new_tokens: int) -> str:
        retry = 0
        while True:
            try:
                return self._complete(messages, max_new_tokens)
            except LLMUnavailableError as exc:
                retry += 1
                if retry > self.retry.max_retries:
                    raise LLMUnavailableError(
                        f"{exc} (gave up after {retry} attempts; the event is retried later)"
                    ) from exc
                wait = self.retry.delay(retry)
                log.warning("LLM request failed (%s); retry %d/%d in %.1f s", exc, retry,
                            self.retry.max_retries, wait)
                self._sleep(wait)

    def _complete(self, messages: list[ChatMessage], max_new_tokens: int) -> str:
        """One request; failures sorted into "retry" (LLMUnavailableError) and "never" (LLMInvalidResponseError)."""
        try:
            response = self._client.chat.completions.create(
                model=self.model_name,
                messages=cast(Any, [{"role": m["role"], "content": m["content"]} for m in messages]),
                max_tokens=max_new_tokens,
                temperature=0.0,  # greedy, as in process: the same record gives the same draft
            )
        except openai.APITimeoutError as exc:
            raise LLMUnavailableError(f"the LLM server did not answer within the timeout ({self.model_name})") from exc
        except openai.APIConnectionError as exc:
            raise LLMUnavailableError(f"the LLM server cannot be reached ({type(exc.__cause__).__name__})") from exc
        except openai.APIResponseValidationError as exc:
            raise LLMInvalidResponseError(f"the LLM server's answer is not a chat completion: {exc}") from exc
        except openai.APIStatusError as exc:
            if exc.status_code in _RETRY_STATUS or exc.status_code >= 500:
                raise LLMUnavailableError(f"the LLM server answered HTTP {exc.status_code}") from exc
            if exc.status_code in _CONFIG_STATUS:
                raise LLMUnavailableError(
                    f"the LLM server answered HTTP {exc.status_code} for model {self.model_name!r}: check "
                    "MEDBRIDGE_LLM_BASE_URL, MEDBRIDGE_LLM_MODEL and MEDBRIDGE_LLM_API_KEY"
                ) from exc
            raise LLMInvalidResponseError(f"the LLM server rejected the request: HTTP {exc.status_code}") from exc
        return _completion_text(response)


def _as_messages(prompt: Prompt) -> list[ChatMessage]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _completion_text(response: object) -> str:
    """The first choice's text, or LLMInvalidResponseError naming what is missing.

    The client returns whatever JSON (or text) the server sent; only a real ChatCompletion with a
    text message counts as an answer.
    """
    if not isinstance(response, ChatCompletion):
        raise LLMInvalidResponseError(f"the LLM server's answer is not a chat completion ({type(response).__name__})")
    try:
        choices = list(response.choices)
        content = choices[0].message.content if choices else None
    except (AttributeError, TypeError) as exc:
        raise LLMInvalidResponseError("the LLM server's answer has no usable choices") from exc
    if not choices:
        raise LLMInvalidResponseError("the LLM server's answer holds no choices")
    if not isinstance(content, str):
        raise LLMInvalidResponseError("the LLM server's answer holds no message text")
    return content.strip()
