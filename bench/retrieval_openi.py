"""Retrieval quality on the Open-i chest X-ray reports: recall@5 for BM25, dense and fused.

    PYTHONPATH=$PWD .venv/bin/python bench/retrieval_openi.py [--queries 300] [--k 5]

Calls knowledge.evaluation.retrieval.retrieval_recall_at_k (what `medbridge eval` calls) on the
reports torchxrayvision ships (every one with text), and prints a table with each retriever's ratio to BM25 (the
baseline, measured in the same run) and the wall time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()

    from knowledge.evaluation.openi import load_reports
    from knowledge.evaluation.retrieval import retrieval_recall_at_k

    started = time.perf_counter()
    reports = load_reports(keep="any text")
    loaded = time.perf_counter() - started
    scores = retrieval_recall_at_k(reports, args.k, queries=args.queries)
    total = time.perf_counter() - started
    print(f"{len(reports):,} Open-i reports, {args.queries} queries (findings), k={args.k}")
    print(f"| retriever | recall@{args.k} | ratio to BM25 |")
    print("|-----------|----------|---------------|")
    for name in ("bm25", "dense", "fused"):
        print(f"| {name:<9} | {scores[name]:8.3f} | {scores[name] / scores['bm25']:13.2f} |")
    print(f"wall: {total:.0f} s (reading the archive {loaded:.0f} s)")


if __name__ == "__main__":
    main()
