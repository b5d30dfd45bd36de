"""``medbridge eval``: every offline measurement, run in one process and written as one Markdown section.

Sections: retrieval (rows added by ``knowledge.evaluation.retrieval``), then impression drafting and
citations (``knowledge.evaluation.drafting``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict

from knowledge.embedding import SentenceEmbedder
from knowledge.evaluation import drafting
from knowledge.evaluation.openi import OpenIReport, load_reports
from knowledge.evaluation.retrieval import report_passage, retrieval_recall_at_k
from knowledge.evaluation.vectors import embed_cached
from knowledge.generation.backends import GeneratorConfig, open_text_generator
from knowledge.generation.protocol import TextGenerator
from knowledge.grounding import GroundingChecker

log = logging.getLogger(__name__)

Backend = Literal["in-process", "server"]


class EvalOptions(BaseModel):
    """What ``medbridge eval`` runs. ``limit``: reports of the fixed drafting subset (200 = all of it);
    ``kb_limit``: knowledge-base reports kept (None = all, about 3,200; fewer for a quick run);
    ``backends``: which models draft, each a row: the in-process transformers model (``llm_model``, None = the
    demo SmolLM2) and/or the OpenAI-compatible server ``server`` names (its ``base_url`` and ``model``)."""

    model_config = ConfigDict(frozen=True)

    limit: int = 40
    k: int = 3
    max_new_tokens: int = 40
    kb_limit: int | None = None
    llm_model: Path | None = None
    models_dir: Path
    threads: int | None = 1
    retrieval_queries: int = 300  # 0 leaves the retrieval section out
    backends: tuple[Backend, ...] = ("in-process",)
    server: GeneratorConfig | None = None
    cache_dir: Path | None = None  # where report vectors are cached between runs (None: embed every run)


def server_label(base_url: str) -> str:
    """How a server row is named: "through <host:port> (server)"."""
    return f"through {urlsplit(base_url).netloc or base_url} (server)"


def run_evaluation(options: EvalOptions, progress: Callable[[str], None] = log.info) -> str:
    """Run every measurement and return the Markdown (headings, tables, the command's options).

    Raises:
        ValueError: the server backend is asked for without a server (a base URL and a model name).
        knowledge.evaluation.openi.OpenIError, knowledge.generation.protocol.LLMError: see their messages.
    """
    if "server" in options.backends and (options.server is None or not options.server.base_url):
        raise ValueError("the server backend needs MEDBRIDGE_LLM_BASE_URL (or --base-url URL --model NAME)")
    started = time.perf_counter()
    reports = load_reports(keep="findings and impression")
    subset, kb_reports = drafting.split_subset(reports, options.limit)
    if options.kb_limit is not None:
        kb_reports = kb_reports[: options.kb_limit]
    answer, share = drafting.most_common_impression(kb_reports)
    progress(f"{len(reports)} Open-i reports: {len(subset)} to draft, {len(kb_reports)} as the knowledge base, "
             f"{time.perf_counter() - started:.0f} s")

    embedder = SentenceEmbedder()
    # Each report is embedded once, as the retrieval section's passage (the whole report); the drafting index ranks
    # the knowledge base by those same vectors. A quick run without the retrieval section embeds its few reports.
    with_text = load_reports(keep="any text") if options.retrieval_queries > 0 else ()
    needed = list(with_text) or list(kb_reports)
    vectors = embed_cached(
        embedder, [report_passage(r).embedding_text() for r in needed], options.cache_dir,
        progress=lambda i, n: progress(f"embedded {i}/{n} reports, {time.perf_counter() - started:.0f} s"),
    )
    by_uid = dict(zip((r.uid for r in needed), vectors, strict=True))
    index = drafting.KnowledgeIndex(kb_reports, embedder, np.stack([by_uid[r.uid] for r in kb_reports]))
    passages = index.top_many([r.findings for r in subset], options.k)  # the same passages for every backend
    progress(f"knowledge base ready ({len(kb_reports)} reports), {time.perf_counter() - started:.0f} s")
    checker = GroundingChecker(embedder)
    # The backends draft at the same time: the in-process model computes on one thread while the server computes
    # in its own process, so the two rows take about the longer of the two instead of their sum. The retrieval
    # section's queries run meanwhile on this thread.
    sections: list[str] = []
    with ThreadPoolExecutor(max_workers=len(options.backends), thread_name_prefix="eval-backend") as pool:
        futures = [pool.submit(_draft_with, backend, options, subset, passages, checker, progress, started)
                   for backend in options.backends]
        if with_text:
            sections.append(_retrieval_section(options.retrieval_queries, with_text, by_uid))
            progress(f"retrieval measured, {time.perf_counter() - started:.0f} s")
        drafted = [future.result() for future in futures]
    rows = [drafting.baseline_row(subset, answer), *drafted]
    rows.append(drafting.ceiling_row(subset))
    sections.append(
        "### Impression drafting and citations (Open-i)\n\n"
        f"{len(subset)} reports of the fixed subset (FINDINGS in, IMPRESSION out), {len(kb_reports)} other "
        f"reports as the knowledge base; the baseline's answer is {share:.1%} of the knowledge base's "
        "impressions.\n\n" + drafting.drafting_table(rows)
    )
    return "\n\n".join([*sections, f"`{_command(options)}`: {time.perf_counter() - started:.0f} s in all."]) + "\n"


def _draft_with(
    backend: Backend,
    options: EvalOptions,
    subset: Sequence[OpenIReport],
    passages: Sequence[Sequence[str]],
    checker: GroundingChecker,
    progress: Callable[[str], None],
    started: float,
) -> drafting.DraftingRow:
    """Open one backend, draft every report of ``subset`` with it, close it, and score the drafts (while the other
    backend may still be drafting)."""
    llm, served_by = _open_backend(backend, options)
    try:
        progress(f"{llm.model_name} {served_by} ready, {time.perf_counter() - started:.0f} s")
        drafts = drafting.generate_drafts(
            llm, subset, passages, k=options.k, max_new_tokens=options.max_new_tokens, served_by=served_by,
            progress=lambda i, n: progress(f"{llm.model_name} {served_by}: drafted {i}/{n}, "
                                           f"{time.perf_counter() - started:.0f} s") if i % 10 == 0 or i == n else None,
        )
    finally:
        llm.close()
    return drafting.score_drafts(subset, passages, drafts, checker)


def _open_backend(backend: Backend, options: EvalOptions) -> tuple[TextGenerator, str]:
    """The generator of one backend and how its row names it."""
    if backend == "server":
        assert options.server is not None  # checked by run_evaluation
        return open_text_generator(options.server), server_label(options.server.base_url)
    from knowledge.generation.transformers_backend import load_text_generator

    return load_text_generator(options.llm_model, options.models_dir, "cpu", num_threads=options.threads), "in process"


def _command(options: EvalOptions) -> str:
    """The command line that reproduces the run (the server's API key is never part of it)."""
    parts = [f"medbridge eval --limit {options.limit} --k {options.k} --max-new-tokens {options.max_new_tokens}",
             f"--retrieval-queries {options.retrieval_queries}"]
    if options.kb_limit is not None:
        parts.append(f"--kb-limit {options.kb_limit}")
    backend = "both" if len(set(options.backends)) == 2 else options.backends[0]
    parts.append(f"--backend {backend}")
    if "server" in options.backends and options.server is not None:
        parts.append(f"--base-url {options.server.base_url} --model {options.server.model}")
    return " ".join(parts)


def _retrieval_section(
    queries: int, reports: Sequence[OpenIReport], vectors: Mapping[str, np.ndarray], k: int = 5
) -> str:
    """Recall@k of BM25, dense and fused retrieval over the Open-i reports with text (``retrieval_recall_at_k``),
    each report's passage vector given in ``vectors`` by uid."""
    recall = retrieval_recall_at_k(reports, k, queries=queries, vectors=vectors)
    rows = "\n".join(f"| {name} | {recall[name]:.3f} |" for name in ("bm25", "dense", "fused"))
    return (f"### Retrieval (Open-i)\n\n{queries} queries (a report's findings; the report itself excluded), each "
            f"of the {len(reports):,} reports with text one passage; a passage is relevant when it shares a major "
            f"MeSH term with the query's report.\n\n"
            f"| retriever | recall@{k} |\n|---|---|\n{rows}")
