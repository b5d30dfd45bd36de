"""Retrieval quality on Open-i chest X-ray reports: recall@k of passages sharing a MeSH label.

Every report with text becomes one passage ("Findings: ... Impression: ..."). A fixed sample of
reports with findings and labels serves as queries: the query is the report's FINDINGS alone, and a
passage is relevant when it shares a main MeSH term with the query report (its own passage is
excluded). The score per query is the capped recall |relevant in top k| / min(k, |relevant|), the
BEIR convention, so a query with two relevant passages can reach 1.0; it is averaged over queries.
Each retriever is the knowledge base's own (knowledge.store.KnowledgeBase): BM25
(``lexical_ranking``), dense HNSW (``dense_query``) and their reciprocal rank fusion (``query``).
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from knowledge.evaluation.openi import OpenIReport
from knowledge.store import KnowledgeBase, Passage

logger = logging.getLogger(__name__)

SOURCE_OPENI = "Open-i reports"
DEFAULT_QUERIES = 300


def report_passage(report: OpenIReport) -> Passage:
    """The passage a report becomes; its id is ``openi:<uid>``."""
    parts = [f"Findings: {report.findings}" if report.findings else "", f"Impression: {report.impression}"
             if report.impression else ""]
    return Passage(id=f"openi:{report.uid}", source=SOURCE_OPENI, title="Chest X-ray report",
                   text=" ".join(p for p in parts if p))


def retrieval_recall_at_k(
    reports: Sequence[OpenIReport],
    k: int = 5,
    *,
    queries: int = DEFAULT_QUERIES,
    seed: int = 0,
    kb_path: Path | None = None,
    vectors: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Mean capped recall@``k`` for ``"bm25"``, ``"dense"`` and ``"fused"`` (see the module docstring).

    Args:
        reports: e.g. ``knowledge.evaluation.openi.load_reports(keep="any text")`` (every report with text).
        queries: how many reports (with findings and labels) are drawn as queries, with ``seed``;
            all of them when there are fewer.
        kb_path: folder for the knowledge base of the reports; a temporary one by default. Given,
            a second run reuses its embeddings (ids are stable) and takes seconds.
        vectors: each report's passage vector (MiniLM of ``report_passage(r).embedding_text()``) by
            ``report.uid``, when the caller has them (``medbridge eval`` embeds the reports once for this
            section and the drafting index); embedded here otherwise.

    Returns:
        ``{"bm25": r, "dense": r, "fused": r}``, each in [0, 1].

    Raises:
        ValueError: ``k`` < 1, or no report qualifies as a query.
        knowledge.store.KnowledgeBaseError: the knowledge base cannot be built.

    About 60-90 s for the 3,955 reports on two CPU cores (embedding them is most of it).
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    passages = {r.uid: report_passage(r) for r in reports if r.findings or r.impression}
    candidates = [r for r in reports if r.findings and r.labels and r.uid in passages]
    if not candidates:
        raise ValueError("no report has both findings and MeSH labels to query with")
    sample = random.Random(seed).sample(candidates, min(queries, len(candidates)))
    labels = {r.uid: r.labels for r in reports}
    relevant_count = {
        q.uid: sum(1 for uid in passages if uid != q.uid and labels[uid] & q.labels) for q in sample
    }
    with tempfile.TemporaryDirectory(prefix="medbridge-eval-") as tmp:
        kb = KnowledgeBase(kb_path or Path(tmp), collection="openi-eval")
        started = time.perf_counter()
        stored = list(passages.values())
        kb.add(stored, [vectors[uid].tolist() for uid in passages] if vectors is not None else None)
        logger.info("retrieval eval: %d passages stored in %.0f s", kb.count(), time.perf_counter() - started)
        rankings: dict[str, list[list[str]]] = {"bm25": [], "dense": [], "fused": []}
        for q in sample:
            # k + 1: the query's own report comes back too and is dropped.
            rankings["bm25"].append([pid for pid, _ in kb.lexical_ranking(q.findings, k + 1, source=SOURCE_OPENI)])
            rankings["dense"].append([p.id for p in kb.dense_query(q.findings, k + 1, source=SOURCE_OPENI)])
            rankings["fused"].append([p.id for p in kb.query(q.findings, k + 1, source=SOURCE_OPENI)])
    results: dict[str, float] = {}
    for name, per_query in rankings.items():
        scores = []
        for q, ranked in zip(sample, per_query, strict=True):
            top = [pid.removeprefix("openi:") for pid in ranked if pid != f"openi:{q.uid}"][:k]
            hits = sum(1 for uid in top if labels[uid] & q.labels)
            scores.append(hits / min(k, relevant_count[q.uid]) if relevant_count[q.uid] else 0.0)
        results[name] = sum(scores) / len(scores)
    return results
