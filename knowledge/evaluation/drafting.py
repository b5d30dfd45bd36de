"""Impression drafting and citation grounding, measured on Open-i chest X-ray reports (``medbridge eval``).

For a fixed subset of reports, the model reads a report's FINDINGS and the ``k`` most similar other reports
(MiniLM, exact cosine scan; the other 3,200+ reports are the knowledge base, numbered passages [1..k]) and
drafts the IMPRESSION. The draft goes through the same grounding as the clinical operator
(knowledge.grounding), and is scored against the radiologist's impression:

- ROUGE-L: F-measure of the longest common subsequence of lower-case word tokens (as ``rouge-score``'s
  ``rougeL`` without stemming).
- MeSH-finding F1: micro F1 over (report, finding) pairs, where a report's true findings are its Open-i
  MeSH major labels mapped to 16 common chest findings (``normal`` when none maps), and a text's findings
  are those it mentions outside a negated clause ("no pleural effusion" mentions none).
- Citations: the share of [n] numbers that point at a passage given, before and after grounding (after:
  must be 100%), and the share of drafted sentences the grounding check supports.

The trivial baseline always answers the knowledge base's most common impression ("No acute
cardiopulmonary abnormality", 11.6% of the reports).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydantic import BaseModel, ConfigDict

from knowledge.embedding import SentenceEmbedder
from knowledge.evaluation.openi import OpenIReport
from knowledge.generation.protocol import BatchTextGenerator, ChatMessage, TextGenerator
from knowledge.grounding import (
    GroundingChecker,
    count_citations,
    remove_invalid_citations,
)

# The fixed subset: SUBSET_SIZE reports spread evenly over the report numbers; --limit takes its first N.
SUBSET_SIZE = 200
PASSAGE_WORDS = 40  # a prior report's findings are cut to this many words: the prompt stays short on CPU
# Prompts an in-process model drafts in one generate(): on one CPU thread 8 prompts of ~450 tokens cost 3.3 s a
# draft against 4.4 s one at a time (the prompt's forward dominates; the batch amortises the per-token overhead).
DRAFT_BATCH = 8

SYSTEM_PROMPT = (
    "You are a radiologist. Write the IMPRESSION of a chest X-ray report in one or two short sentences, "
    "based on the FINDINGS. Similar prior reports are given as numbered passages; cite the ones your "
    "impression agrees with as [n]."
)
ONE_SHOT_REQUEST = (
    "Prior reports:\n[1] Findings: Heart size normal. Lungs are clear. No effusion or pneumothorax. "
    "Impression: No acute cardiopulmonary abnormality.\n[2] Findings: Right lower lobe airspace opacity. "
    "Impression: Right lower lobe pneumonia.\n\nFindings: The heart is normal in size. The lungs are clear "
    "without focal consolidation.\n\nImpression:"
)
ONE_SHOT_ANSWER = "No acute cardiopulmonary abnormality [1]."

# label: (pattern over a lower-case MeSH major term, pattern over lower-case report text)
FINDINGS: dict[str, tuple[str, str]] = {
    "cardiomegaly": (
        r"cardiomegaly", r"cardiomegaly|enlarged (?:heart|cardiac)|cardiac enlargement|heart (?:size )?is enlarged"
    ),
    "atelectasis": (r"atelectasis", r"atelecta"),
    "opacity": (
        r"opacity|density|airspace disease|infiltrate|consolidation",
        r"opacit|densit|airspace disease|infiltrat|consolidat",
    ),
    "pleural effusion": (r"pleural effusion", r"effusion"),
    "granuloma": (r"granulom", r"granulom"),
    "degenerative spine": (
        r"degenerative|spondylosis|osteophyte|arthritis", r"degenerative|spondylosis|osteophyt|arthritis"
    ),
    "scoliosis": (r"scoliosis", r"scoliosis"),
    "emphysema": (
        r"emphysema|chronic obstructive|hyperinflation", r"emphysema|copd|chronic obstructive|hyperinflat|hyperexpan"
    ),
    "pneumonia": (r"pneumonia", r"pneumonia"),
    "edema": (r"edema|congestion", r"edema|congesti"),
    "nodule": (r"nodule", r"nodul"),
    "fracture": (r"fracture", r"fracture"),
    "hernia": (r"hernia", r"hernia"),
    "pneumothorax": (r"pneumothorax", r"pneumothora"),
    "scarring": (r"cicatrix", r"scar"),
    "device": (
        r"catheter|surgical instruments|implanted medical device", r"catheter|pacemaker|sternotom|surgical clip|device"
    ),
}
NORMAL = "normal"
_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|resolved|clear of|absence of)\b")
_CLAUSE = re.compile(r"[.;:]|\bbut\b|\bhowever\b")
_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of two texts on lower-case word tokens."""
    a, b = _TOKEN.findall(prediction.lower()), _TOKEN.findall(reference.lower())
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def mesh_labels(report: OpenIReport) -> set[str]:
    """The report's MeSH major terms mapped to the finding labels; {"normal"} when none maps."""
    labels = {name for term in report.mesh for name, (mesh, _) in FINDINGS.items() if re.search(mesh, term.lower())}
    return labels or {NORMAL}


def text_findings(text: str) -> set[str]:
    """The finding labels ``text`` mentions outside a negated clause; {"normal"} when it mentions none."""
    found: set[str] = set()
    for clause in _CLAUSE.split(text.lower()):
        for name, (_, pattern) in FINDINGS.items():
            match = re.search(pattern, clause)
            if match and not _NEGATION.search(clause[: match.start()]):
                found.add(name)
    return found or {NORMAL}


def micro_f1(predicted: Sequence[set[str]], truth: Sequence[set[str]]) -> float:
    tp = sum(len(p & t) for p, t in zip(predicted, truth, strict=True))
    fp = sum(len(p - t) for p, t in zip(predicted, truth, strict=True))
    fn = sum(len(t - p) for p, t in zip(predicted, truth, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def split_subset(reports: Sequence[OpenIReport], limit: int) -> tuple[list[OpenIReport], list[OpenIReport]]:
    """(the first ``limit`` of the fixed evaluation subset, the knowledge base: every report outside it).

    The knowledge base is the same whatever ``limit`` is, so a short run measures the same task."""
    step = max(len(reports) // SUBSET_SIZE, 1)
    subset = list(reports[::step][:SUBSET_SIZE])
    chosen = {r.report_id for r in subset}
    return subset[:limit], [r for r in reports if r.report_id not in chosen]


def most_common_impression(reports: Sequence[OpenIReport]) -> tuple[str, float]:
    """The most frequent impression (compared without case and end punctuation) and its share."""
    counts = Counter(r.impression.lower().strip(" .") for r in reports)
    text, n = counts.most_common(1)[0]
    return text[0].upper() + text[1:] + ".", n / len(reports)


def passage_text(report: OpenIReport) -> str:
    words = report.findings.split()
    findings = " ".join(words[:PASSAGE_WORDS]) + (" ..." if len(words) > PASSAGE_WORDS else "")
    return f"Findings: {findings} Impression: {report.impression}"


class DraftingRow(BaseModel):
    """One line of the drafting table. Citation shares are None for systems that do not cite."""

    model_config = ConfigDict(frozen=True)

    system: str
    reports: int
    rouge_l: float
    mesh_f1: float
    citations_valid_raw: float | None = None
    citations_valid_grounded: float | None = None
    sentences_supported: float | None = None
    drafts_with_citation: float | None = None
    seconds: float = 0.0


class KnowledgeIndex:
    """The knowledge-base reports with their MiniLM vectors: an exact cosine scan (a few thousand rows).

    ``vectors`` (one row per report) are what the reports are ranked by; ``medbridge eval`` passes each whole
    report's vector (``knowledge.evaluation.retrieval.report_passage``, which the retrieval section embeds anyway)
    so the reports are embedded once. Without them, the passage texts given to the model are embedded."""

    def __init__(
        self, reports: Sequence[OpenIReport], embedder: SentenceEmbedder, vectors: np.ndarray | None = None
    ) -> None:
        self.texts = [passage_text(r) for r in reports]
        self.embedder = embedder
        if vectors is not None and len(vectors) != len(self.texts):
            raise ValueError(f"{len(vectors)} vectors for {len(self.texts)} knowledge-base reports")
        self.vectors = embedder.embed(self.texts) if vectors is None else vectors

    def top(self, query: str, k: int) -> list[str]:
        return self.top_many([query], k)[0]

    def top_many(self, queries: Sequence[str], k: int) -> list[list[str]]:
        """The ``k`` best passages of each query; the queries are embedded in one batch."""
        if not queries:
            return []
        scores = self.embedder.embed(list(queries)) @ self.vectors.T
        return [[self.texts[i] for i in np.argsort(-row)[:k]] for row in scores]


def build_messages(findings: str, passages: Sequence[str]) -> list[ChatMessage]:
    refs = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": ONE_SHOT_REQUEST},
        {"role": "assistant", "content": ONE_SHOT_ANSWER},
        {"role": "user", "content": f"Prior reports:\n{refs}\n\nFindings: {findings}\n\nImpression:"},
    ]


def baseline_row(subset: Sequence[OpenIReport], answer: str) -> DraftingRow:
    return DraftingRow(
        system=f'Baseline: always "{answer}"',
        reports=len(subset),
        rouge_l=float(np.mean([rouge_l(answer, r.impression) for r in subset])),
        mesh_f1=micro_f1([text_findings(answer)] * len(subset), [mesh_labels(r) for r in subset]),
    )


def ceiling_row(subset: Sequence[OpenIReport]) -> DraftingRow:
    """The radiologist's own impression through the finding extractor: how far MeSH-finding F1 can go."""
    return DraftingRow(
        system="Radiologist's impression (extractor ceiling)",
        reports=len(subset),
        rouge_l=1.0,
        mesh_f1=micro_f1([text_findings(r.impression) for r in subset], [mesh_labels(r) for r in subset]),
    )


class Drafts(BaseModel):
    """One backend's raw drafts, in subset order, and what producing them took."""

    model_config = ConfigDict(frozen=True)

    system: str  # the row's label: model, backend, k, token limit
    texts: tuple[str, ...]
    hit_limit: tuple[bool, ...]  # the draft used (nearly) all its new tokens: its last sentence may be cut
    seconds: float


def generate_drafts(
    llm: TextGenerator,
    subset: Sequence[OpenIReport],
    passages: Sequence[Sequence[str]],
    *,
    k: int,
    max_new_tokens: int,
    served_by: str = "in process",
    progress: Callable[[int, int], None] | None = None,
) -> Drafts:
    """The model's draft of each report's impression, in subset order, up to ``llm.max_concurrency`` at once (a
    server batches them; in process it is 1). Greedy decoding makes them deterministic given the model, whatever
    order they finish in. ``served_by`` names the backend in the row's label."""
    start = time.perf_counter()
    prompts = [build_messages(r.findings, p) for r, p in zip(subset, passages, strict=True)]
    texts = _drafts(llm, prompts, max_new_tokens, progress)
    return Drafts(
        system=f"{llm.model_name} {served_by} (k={k}, {max_new_tokens} new tokens), grounded",
        texts=tuple(texts),
        hit_limit=tuple(llm.count_tokens(t) >= max_new_tokens - 2 for t in texts),
        seconds=time.perf_counter() - start,
    )


def score_drafts(
    subset: Sequence[OpenIReport],
    passages: Sequence[Sequence[str]],
    drafts: Drafts,
    checker: GroundingChecker,
) -> DraftingRow:
    """Ground each draft in its passages (as the clinical operator does) and score it against the radiologist's
    impression; the row's seconds are drafting plus grounding."""
    start = time.perf_counter()
    rouge: list[float] = []
    predicted: list[set[str]] = []
    raw_valid = raw_all = clean_valid = clean_all = supported = sentences = with_citation = 0
    for report, given, draft, hit_limit in zip(subset, passages, drafts.texts, drafts.hit_limit, strict=True):
        text, grounding = checker.ground(draft, given, hit_limit=hit_limit)
        raw_all += count_citations(draft)
        raw_valid += grounding.citations_kept
        clean_all += count_citations(text)
        clean_valid += remove_invalid_citations(text, len(given))[1]
        supported += grounding.supported_count
        sentences += len(grounding.sentences)
        with_citation += bool(grounding.citations_kept)
        rouge.append(rouge_l(text, report.impression))
        predicted.append(text_findings(text))
    return DraftingRow(
        system=drafts.system,
        reports=len(subset),
        rouge_l=float(np.mean(rouge)) if rouge else 0.0,
        mesh_f1=micro_f1(predicted, [mesh_labels(r) for r in subset]),
        citations_valid_raw=raw_valid / raw_all if raw_all else None,
        citations_valid_grounded=clean_valid / clean_all if clean_all else None,
        sentences_supported=supported / sentences if sentences else None,
        drafts_with_citation=with_citation / len(subset) if subset else None,
        seconds=drafts.seconds + time.perf_counter() - start,
    )


def _drafts(
    llm: TextGenerator,
    prompts: Sequence[list[ChatMessage]],
    max_new_tokens: int,
    progress: Callable[[int, int], None] | None,
) -> list[str]:
    """The model's draft for each prompt, in prompt order, ``llm.max_concurrency`` at a time."""
    done = 0
    lock = threading.Lock()

    def draft(messages: list[ChatMessage]) -> str:
        nonlocal done
        text = llm.generate(messages, max_new_tokens).strip()
        if progress is not None:
            with lock:
                done += 1
                progress(done, len(prompts))
        return text

    if isinstance(llm, BatchTextGenerator):
        return _batched_drafts(llm, prompts, max_new_tokens, progress)
    if llm.max_concurrency <= 1:
        return [draft(m) for m in prompts]
    with ThreadPoolExecutor(max_workers=llm.max_concurrency, thread_name_prefix="eval-draft") as pool:
        return list(pool.map(draft, prompts))  # map keeps the prompts' order, whatever finishes first


def _batched_drafts(
    llm: BatchTextGenerator,
    prompts: Sequence[list[ChatMessage]],
    max_new_tokens: int,
    progress: Callable[[int, int], None] | None,
) -> list[str]:
    """The drafts of ``prompts`` in prompt order, ``DRAFT_BATCH`` at a time; prompts of similar length share a
    batch, so little of a batch's forward is spent on padding."""
    order = sorted(range(len(prompts)), key=lambda i: llm.count_prompt_tokens(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), DRAFT_BATCH):
        batch = order[start : start + DRAFT_BATCH]
        for i, text in zip(batch, llm.generate_batch([prompts[i] for i in batch], max_new_tokens), strict=True):
            texts[i] = text.strip()
        if progress is not None:
            progress(start + len(batch), len(prompts))
    return texts


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def drafting_table(rows: Sequence[DraftingRow]) -> str:
    """The drafting and citation rows as a Markdown table."""
    lines = [
        "| System | Reports | ROUGE-L | MeSH-finding F1 | [n] valid (raw) | [n] valid (grounded) "
        "| Sentences supported | Drafts citing | Seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.reports} | {r.rouge_l:.3f} | {r.mesh_f1:.3f} | {_pct(r.citations_valid_raw)} "
            f"| {_pct(r.citations_valid_grounded)} | {_pct(r.sentences_supported)} "
            f"| {_pct(r.drafts_with_citation)} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)
