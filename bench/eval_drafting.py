"""In-process drafting speed of ``medbridge eval``: one prompt per ``generate`` (the baseline) against batches.

    PYTHONPATH=$PWD .venv/bin/python bench/eval_drafting.py [--n 16] [--batch 4,8,16] [--threads 1]

Drafts the first ``--n`` reports of the fixed Open-i subset with SmolLM2-135M in process (the eval's prompts: k=3
passages, 40 new tokens), first one at a time, then ``TransformersGenerator.generate_batch`` for each batch size
(prompts sorted by length, as the eval does), and prints seconds per draft, the ratio to the one-at-a-time run
measured in the same process, and how many drafts equal the one-at-a-time ones.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch", default="4,8,16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "medbridge-test-cache")
    args = parser.parse_args()

    from knowledge.embedding import SentenceEmbedder
    from knowledge.evaluation import drafting
    from knowledge.evaluation.openi import load_reports
    from knowledge.generation.transformers_backend import load_text_generator

    reports = load_reports(keep="findings and impression")
    subset, kb = drafting.split_subset(reports, args.n)
    index = drafting.KnowledgeIndex(kb[:400], SentenceEmbedder())  # a small knowledge base: the speed is the point
    prompts = [drafting.build_messages(r.findings, p)
               for r, p in zip(subset, index.top_many([r.findings for r in subset], 3), strict=True)]
    llm = load_text_generator(None, args.models_dir, "cpu", num_threads=args.threads)
    started = time.perf_counter()
    alone = [llm.generate(p, args.max_new_tokens) for p in prompts]
    base = (time.perf_counter() - started) / len(prompts)
    print(f"{len(prompts)} drafts, {args.max_new_tokens} new tokens, {args.threads} torch thread(s)\n")
    print("| batch | s/draft | speed-up | drafts equal to one at a time |\n|---:|---:|---:|---:|")
    print(f"| 1 | {base:.2f} | 1.00x | {len(prompts)}/{len(prompts)} |")
    order = sorted(range(len(prompts)), key=lambda i: llm.count_prompt_tokens(prompts[i]))
    for size in (int(b) for b in args.batch.split(",")):
        texts = [""] * len(prompts)
        started = time.perf_counter()
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            for i, text in zip(chunk, llm.generate_batch([prompts[i] for i in chunk], args.max_new_tokens),
                               strict=True):
                texts[i] = text
        per = (time.perf_counter() - started) / len(prompts)
        same = sum(a == b for a, b in zip(alone, texts, strict=True))
        print(f"| {size} | {per:.2f} | {base / per:.2f}x | {same}/{len(prompts)} |", flush=True)


if __name__ == "__main__":
    main()
