"""``medbridge eval``: every offline measurement, run in one process and written as one Markdown section.

Sections: retrieval (rows added by ``knowledge.evaluation.retrieval``), then impression drafting and
citations (``knowledge.evaluation.drafting``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from inference.clinical.grounding import GroundingChecker
from knowledge.embedding import SentenceEmbedder
from knowledge.evaluation import drafting
from knowledge.evaluation.openi_reports import load_reports
from knowledge.generation.transformers_backend import load_text_generator

log = logging.getLogger(__name__)


class EvalOptions(BaseModel):
    """What ``medbridge eval`` runs. ``limit``: reports of the fixed drafting subset (200 = all of it);
    ``kb_limit``: knowledge-base reports kept (None = all, about 3,200; fewer for a quick run)."""

    model_config = ConfigDict(frozen=True)

    limit: int = 40
    k: int = 3
    max_new_tokens: int = 40
    kb_limit: int | None = None
    llm_model: Path | None = None
    models_dir: Path
    threads: int | None = 1
    retrieval_queries: int = 300  # 0 leaves the retrieval section out


def run_evaluation(options: EvalOptions, progress: Callable[[str], None] = log.info) -> str:
    """Run every measurement and return the Markdown (headings, tables, the command's options)."""
    started = time.perf_counter()
    reports = load_reports()
    subset, kb_reports = drafting.split_subset(reports, options.limit)
    if options.kb_limit is not None:
        kb_reports = kb_reports[: options.kb_limit]
    answer, share = drafting.most_common_impression(kb_reports)
    progress(f"{len(reports)} Open-i reports: {len(subset)} to draft, {len(kb_reports)} as the knowledge base, "
             f"{time.perf_counter() - started:.0f} s")

    sections: list[str] = []
    if options.retrieval_queries > 0:
        sections.append(_retrieval_section(options.retrieval_queries))
        progress(f"retrieval measured, {time.perf_counter() - started:.0f} s")

    embedder = SentenceEmbedder()
    index = drafting.KnowledgeIndex(kb_reports, embedder)
    progress(f"knowledge base embedded ({len(kb_reports)} reports), {time.perf_counter() - started:.0f} s")
    llm = load_text_generator(options.llm_model, options.models_dir, "cpu", num_threads=options.threads)
    progress(f"{llm.model_name} loaded, {time.perf_counter() - started:.0f} s")
    rows = [
        drafting.baseline_row(subset, answer),
        drafting.draft_row(
            subset, index, llm, GroundingChecker(embedder), k=options.k, max_new_tokens=options.max_new_tokens,
            progress=lambda i, n: progress(f"drafted {i}/{n}") if i % 10 == 0 or i == n else None,
        ),
        drafting.ceiling_row(subset),
    ]
    sections.append(
        "### Impression drafting and citations (Open-i)\n\n"
        f"{len(subset)} reports of the fixed subset (FINDINGS in, IMPRESSION out), {len(kb_reports)} other "
        f"reports as the knowledge base; the baseline's answer is {share:.1%} of the knowledge base's "
        "impressions.\n\n" + drafting.drafting_table(rows)
    )
    command = (f"medbridge eval --limit {options.limit} --k {options.k} --max-new-tokens {options.max_new_tokens}"
               f" --retrieval-queries {options.retrieval_queries}"
               + (f" --kb-limit {options.kb_limit}" if options.kb_limit is not None else ""))
    return "\n\n".join([*sections, f"`{command}`: {time.perf_counter() - started:.0f} s in all."]) + "\n"


def _retrieval_section(queries: int, k: int = 5) -> str:
    """Recall@k of BM25, dense and fused retrieval over all the Open-i reports (``retrieval_recall_at_k``)."""
    from knowledge.evaluation.openi import load_openi_reports
    from knowledge.evaluation.retrieval import retrieval_recall_at_k

    recall = retrieval_recall_at_k(load_openi_reports(), k, queries=queries)
    rows = "\n".join(f"| {name} | {recall[name]:.3f} |" for name in ("bm25", "dense", "fused"))
    return (f"### Retrieval (Open-i)\n\n{queries} queries (a report's findings; the report itself excluded), every "
            f"report one passage; a passage is relevant when it shares a major MeSH term with the query's report.\n\n"
            f"| retriever | recall@{k} |\n|---|---|\n{rows}")
