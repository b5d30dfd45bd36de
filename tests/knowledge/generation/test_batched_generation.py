"""The in-process model drafts several prompts in one ``generate`` exactly as it drafts them one at a time."""

from __future__ import annotations

from knowledge.evaluation.drafting import build_messages
from knowledge.generation.protocol import BatchTextGenerator, Prompt, TextGenerator


def test_a_batch_of_prompts_of_different_lengths_gives_the_one_at_a_time_drafts(
    in_process_smollm2: TextGenerator,
) -> None:
    assert isinstance(in_process_smollm2, BatchTextGenerator)
    prompts: list[Prompt] = [
        build_messages("Heart size normal. Lungs clear.", ["Findings: Normal heart. Impression: Normal chest."]),
        build_messages(
            "Large right pleural effusion with adjacent atelectasis. Left lung clear. Stable cardiomegaly.",
            ["Findings: Right effusion. Impression: Right pleural effusion.",
             "Findings: Enlarged heart. Impression: Cardiomegaly.", "Findings: Clear. Impression: Normal."],
        ),
        "The capital of France is",
    ]
    alone = [in_process_smollm2.generate(p, 8) for p in prompts]
    together = in_process_smollm2.generate_batch(prompts, 8)
    assert together == alone  # left padding and the attention mask leave each prompt's greedy draft unchanged
    assert all(together)
