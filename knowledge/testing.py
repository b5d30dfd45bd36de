"""Test and development helpers: a tiny random Llama that exercises the real generation path.

Its output is random text; assert on structure (non-empty, fits the context), never on words.
"""

from __future__ import annotations

from pathlib import Path

from knowledge.generation.protocol import ensure_offline

_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Clinical-flavoured sentences so the 512-token BPE learns merges for the words prompts use;
# prompts then tokenise at a realistic-ish density instead of byte by byte.
_TRAINING_TEXT = [
    "You are a clinical decision-support assistant writing a short clinical impression for a reviewing "
    "clinician. Use only the numbered reference passages and the patient facts. Cite passages as [1], [2].",
    "Patient: 58-year-old male. Conditions: type 2 diabetes mellitus. Observations: hemoglobin A1c 8.2 %.",
    "ICD-10-CM E11.9: Type 2 diabetes mellitus without complications. Parent: Type 2 diabetes mellitus.",
    "Hypertension, chronic kidney disease, anaemia, heart failure, pneumonia, asthma, obstructive pulmonary.",
    "Solitary pulmonary nodule on chest radiograph; follow-up computed tomography is recommended.",
    "Diagnosis of diabetes: HbA1c of 6.5 percent or higher, fasting plasma glucose of 126 mg/dL or higher.",
    "Reference passages. Medications: metformin, lisinopril, atorvastatin. Clinical impression.",
    "The quick brown fox jumps over the lazy dog while the patient reports cough and fever.",
]


def build_tiny_random_llama(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` with a byte-level BPE tokenizer and chat template.

    Args:
        path: destination folder (created); afterwards a valid ``from_pretrained`` folder.
        seed: weight initialisation seed; the global torch RNG is left untouched.

    Returns:
        ``path``. Takes well under a second.
    """
    ensure_offline()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        # With the default 0.02 init and tied embeddings the residual stream is dominated by the
        # input embedding, so greedy decoding repeats the last prompt token (a newline) forever
        # and the decoded text is empty. A wider init gives varied (still random) tokens.
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
