"""Token counting for a model served over HTTP: the server's own tokenizer, or a local copy of it.

The context budget (Meditron-7B: 2,048 tokens) only holds if prompts are counted with the served
model's tokenizer. llama.cpp's server exposes it as ``POST /tokenize`` and ``/detokenize``;
llama-cpp-python's server as ``POST /extras/tokenize`` and ``/extras/detokenize``. vLLM answers
``/tokenize`` too. Servers without one (TGI's Messages API, Ollama) need the model's tokenizer
folder on disk (``MEDBRIDGE_LLM_TOKENIZER``), loaded with transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from knowledge.generation.protocol import LLMNotFoundError, LLMUnavailableError, ensure_offline

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class _Dialect:
    """One server family's tokenizer endpoints and JSON field names."""

    tokenize_path: str
    text_field: str
    detokenize_path: str
    detokenized_field: str
    extra: tuple[tuple[str, Any], ...] = ()


_LLAMA_CPP = _Dialect("/tokenize", "content", "/detokenize", "content", (("add_special", False),))
_VLLM = _Dialect("/tokenize", "prompt", "/detokenize", "prompt", (("add_special_tokens", False),))
_LLAMA_CPP_PYTHON = _Dialect("/extras/tokenize", "input", "/extras/detokenize", "text")
_DIALECTS = (_LLAMA_CPP, _LLAMA_CPP_PYTHON, _VLLM)


def server_root(base_url: str) -> str:
    """The server's root for its non-OpenAI endpoints: ``http://h:8080/v1`` -> ``http://h:8080``."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class ServerTokenizer:
    """Counts with the tokenizer endpoint the server answers; found once by :meth:`probe`."""

    def __init__(self, client: httpx.Client, dialect: _Dialect) -> None:
        self._client = client
        self._dialect = dialect

    @classmethod
    def probe(cls, client: httpx.Client) -> ServerTokenizer | None:
        """The first dialect whose tokenize endpoint answers with a token list, else ``None``.

        Raises:
            LLMUnavailableError: the server cannot be reached at all.
        """
        for dialect in _DIALECTS:
            try:
                body = {dialect.text_field: "hello", **dict(dialect.extra)}
                response = client.post(dialect.tokenize_path, json=body)
            except httpx.HTTPError as exc:
                raise LLMUnavailableError(f"the LLM server at {client.base_url} cannot be reached: {exc}") from exc
            if response.status_code == 200 and isinstance(_tokens(response), list):
                log.info("LLM server tokenizer: %s", dialect.tokenize_path)
                return cls(client, dialect)
        return None

    def encode(self, text: str) -> list[int]:
        d = self._dialect
        try:
            response = self._client.post(d.tokenize_path, json={d.text_field: text, **dict(d.extra)})
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise LLMUnavailableError(f"the LLM server's tokenizer failed: {type(exc).__name__}") from exc
        tokens = _tokens(response)
        if not isinstance(tokens, list):
            raise LLMUnavailableError("the LLM server's tokenizer answered without a token list")
        return [int(t) for t in tokens]

    def decode(self, ids: list[int]) -> str:
        d = self._dialect
        try:
            response = self._client.post(d.detokenize_path, json={"tokens": ids})
            response.raise_for_status()
            return str(response.json()[d.detokenized_field])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise LLMUnavailableError(f"the LLM server's detokenizer failed: {type(exc).__name__}") from exc


def _tokens(response: httpx.Response) -> object:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("tokens") if isinstance(body, dict) else None


class LocalTokenizer:
    """The served model's tokenizer from a local folder (``tokenizer.json`` and its config)."""

    def __init__(self, folder: Path) -> None:
        ensure_offline()
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise LLMNotFoundError(
                f"no tokenizer at {folder} ({exc}); set MEDBRIDGE_LLM_TOKENIZER to the served model's folder"
            ) from exc

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))
