"""Grounding of a drafted impression in the passages the model was given.

A small language model cites passages it never saw ("[6]" when given five), stops mid-sentence at
its token limit, and writes sentences that its citations do not back. ``ground_impression`` turns a
raw draft into what a reviewer may see:

1. citation numbers that point at no passage given are removed and counted;
2. a draft cut by the token limit loses its unfinished last sentence;
3. each remaining sentence is checked against the passages it cites: it is *supported* when its
   MiniLM embedding is close to a cited passage (cosine >= ``SIMILARITY_MIN`` against the passage or
   one of its sentences) **and** most of its content words occur in the cited passages (share >=
   ``OVERLAP_MIN``). Embeddings alone call two opposite statements about the same organ similar;
   word overlap alone misses paraphrase; requiring both keeps false support rare. A sentence that
   negates ("no", "not", "without") while none of its cited passages negates anything is unsupported
   too: MiniLM scores "X is not present" close to a passage about X. A sentence that cites nothing
   is unsupported: there is nothing to check it against.

No NLI cross-encoder is used: none installs offline here (no model hub), and MiniLM is already
loaded by the knowledge base. Pure apart from the embedder; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from schemas.clinical import GroundedSentence, ImpressionGrounding

# Thresholds chosen on the shipped corpus and Open-i reports (see BENCHMARKS.md, "Grounding"): a
# paraphrase of a cited passage scores 0.55-0.85 cosine, an unrelated clinical sentence 0.05-0.35.
SIMILARITY_MIN = 0.45
OVERLAP_MIN = 0.5

REASON_NO_CITATION = "cites no passage"
REASON_NOT_SIMILAR = "not supported by the cited evidence (meaning differs from the cited passages)"
REASON_FEW_WORDS = "not supported by the cited evidence (its words are not in the cited passages)"
REASON_NEGATION = "not supported by the cited evidence (it negates what the cited passages state)"

CITATION = re.compile(r"\[\s*(\d+(?:\s*(?:[,;]|-|–)\s*\d+)*)\s*\]")
# A sentence ends at . ! or ? (optionally followed by its citations) before whitespace or the end;
# "1.5 cm" and "e.g.x" do not end one because no whitespace follows the period.
_SENTENCE_END = re.compile(r"[.!?]+(?:\s*\[[^\]\n]{0,40}\])*(?=\s|$)")
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an and are as at be been being but by can could for from has have in into is it its may might of on "
    "or that the their there these this those to was were which with within without would should suggest "
    "suggests suggested consistent likely possible patient patients finding findings also than then not no "
    "any all more most other some such".split()
)
_NEGATIONS = frozenset("no not without absent negative none neither nor never".split())


class Embedder(Protocol):
    """Unit-length vectors for texts (``knowledge.embedding.SentenceEmbedder``)."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _numbers(group: str) -> list[int]:
    out: list[int] = []
    for part in re.split(r"\s*[,;]\s*", group):
        bounds = re.split(r"\s*[-–]\s*", part)
        if len(bounds) == 2:
            lo, hi = int(bounds[0]), int(bounds[1])
            out.extend(range(lo, hi + 1) if 0 < hi - lo < 50 else ())
        else:
            out.append(int(bounds[0]))
    return out


def parse_citations(text: str, n_passages: int) -> set[int]:
    """1-based passage numbers cited in ``text``: ``[1]``, ``[2,3]``, ``[1][2]``, ``[2-4]``.

    Numbers outside 1..``n_passages`` are ignored (a model may cite passages it never saw).
    """
    return {n for m in CITATION.finditer(text) for n in _numbers(m.group(1)) if 1 <= n <= n_passages}


def count_citations(text: str) -> int:
    """Every [n] number in ``text``, valid or not (``[2,3]`` counts 2)."""
    return sum(len(_numbers(m.group(1))) for m in CITATION.finditer(text))


def remove_invalid_citations(text: str, n_passages: int) -> tuple[str, int, int]:
    """``text`` with citation numbers outside 1..``n_passages`` removed; (text, kept, removed).

    A bracket left with no valid number disappears with the space before it; one with some valid
    numbers is rewritten as ``[1, 3]``.
    """
    kept = removed = 0

    def rewrite(match: re.Match[str]) -> str:
        nonlocal kept, removed
        numbers = _numbers(match.group(1))
        valid = [n for n in dict.fromkeys(numbers) if 1 <= n <= n_passages]
        kept += len(valid)
        removed += len(numbers) - len([n for n in numbers if 1 <= n <= n_passages])
        return f"[{', '.join(map(str, valid))}]" if valid else ""

    cleaned = CITATION.sub(rewrite, text)
    # The removal leaves "word ." or "word  and"; close the gaps it made.
    cleaned = re.sub(r"[ \t]+([.,;:!?])", r"\1", cleaned)
    cleaned = re.sub(r"[ \t]{2,}", " ", cleaned)
    return cleaned.strip(), kept, removed


def split_sentences(text: str) -> tuple[list[str], str]:
    """The complete sentences of ``text`` (each with its trailing citations) and the unfinished tail."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        sentence = text[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    return sentences, text[start:].strip()


def trim_cut_sentence(text: str, hit_limit: bool) -> tuple[str, bool]:
    """Drop the unfinished last sentence of a draft that hit the token limit; (text, trimmed).

    A draft that stopped on its own keeps a tail without a full stop: the model finished it.
    """
    sentences, tail = split_sentences(text)
    if not hit_limit or not tail:
        return text.strip(), False
    return " ".join(sentences), True


def content_words(text: str) -> set[str]:
    """Lower-case words of 3+ characters that carry meaning, crudely singularised ("effusions")."""
    words = set()
    for w in _WORD.findall(CITATION.sub(" ", text.lower())):
        if len(w) < 3 or w in _STOPWORDS:
            continue
        words.add(w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w)
    return words


def _negates(text: str) -> bool:
    return not _NEGATIONS.isdisjoint(_WORD.findall(text.lower()))


def _passage_units(passage: str) -> list[str]:
    """The passage itself and its sentences: a sentence may paraphrase one line of a long passage."""
    sentences, tail = split_sentences(passage)
    units = [passage, *sentences, *([tail] if tail and sentences else [])]
    return list(dict.fromkeys(u for u in units if u.strip()))


class GroundingChecker:
    """Checks drafted impressions against their passages with one embedder (loaded once)."""

    def __init__(self, embedder: Embedder, *, similarity_min: float = SIMILARITY_MIN,
                 overlap_min: float = OVERLAP_MIN) -> None:
        self.embedder = embedder
        self.similarity_min = similarity_min
        self.overlap_min = overlap_min

    def check(self, sentences: Sequence[str], passages: Sequence[str]) -> list[GroundedSentence]:
        """Each sentence with its support by the passages (numbered from 1) it cites."""
        cited = [sorted(parse_citations(s, len(passages))) for s in sentences]
        needed = sorted({n for numbers in cited for n in numbers})
        units = {n: _passage_units(passages[n - 1]) for n in needed}
        flat = [u for n in needed for u in units[n]]
        checkable = [i for i, numbers in enumerate(cited) if numbers]
        vectors = self.embedder.embed([CITATION.sub(" ", sentences[i]) for i in checkable] + flat)
        sentence_vecs = dict(zip(checkable, vectors[: len(checkable)], strict=True))
        unit_vecs = vectors[len(checkable):]
        offsets: dict[int, tuple[int, int]] = {}
        at = 0
        for n in needed:
            offsets[n] = (at, at + len(units[n]))
            at += len(units[n])
        out: list[GroundedSentence] = []
        for i, sentence in enumerate(sentences):
            numbers = cited[i]
            if not numbers:
                out.append(GroundedSentence(text=sentence, supported=False, reason=REASON_NO_CITATION))
                continue
            rows = np.concatenate([unit_vecs[offsets[n][0]:offsets[n][1]] for n in numbers])
            similarity = float(np.max(rows @ sentence_vecs[i]))
            overlap = self._overlap(sentence, (passages[n - 1] for n in numbers))
            if similarity < self.similarity_min:
                reason = REASON_NOT_SIMILAR
            elif overlap < self.overlap_min:
                reason = REASON_FEW_WORDS
            elif _negates(sentence) and not any(_negates(passages[n - 1]) for n in numbers):
                reason = REASON_NEGATION
            else:
                reason = ""
            supported = not reason
            out.append(GroundedSentence(text=sentence, cited=numbers, supported=supported,
                                        similarity=round(similarity, 3), overlap=round(overlap, 3), reason=reason))
        return out

    @staticmethod
    def _overlap(sentence: str, passages: Iterable[str]) -> float:
        words = content_words(sentence)
        if not words:
            return 0.0
        available: set[str] = set()
        for p in passages:
            available |= content_words(p)
        return len(words & available) / len(words)

    def ground(self, draft: str, passages: Sequence[str], *, hit_limit: bool) -> tuple[str, ImpressionGrounding]:
        """The reviewable text of ``draft`` and what grounding found.

        Returns the draft with invalid citations removed and, when ``hit_limit``, its cut sentence
        trimmed, and the per-sentence support. A draft with no sentence end is one sentence.
        """
        cleaned, kept, removed = remove_invalid_citations(draft, len(passages))
        text, truncated = trim_cut_sentence(cleaned, hit_limit)
        sentences, tail = split_sentences(text)
        if tail:
            sentences.append(tail)
        grounding = ImpressionGrounding(
            sentences=self.check(sentences, passages),
            citations_kept=kept,
            citations_removed=removed,
            truncated=truncated,
        )
        return text, grounding


def no_supported_sentence_text(grounding: ImpressionGrounding) -> str:
    """The plain statement a report carries instead of a draft none of whose sentences is supported."""
    n = len(grounding.sentences)
    drafted = "The model drafted no complete sentence" if n == 0 else (
        f"None of the {n} sentences the model drafted is" if n > 1 else "The one sentence the model drafted is not")
    if n:
        drafted += " supported by the passages it cites"
    return (f"No impression: {drafted}. The draft is not presented as an impression; the retrieved "
            "passages are listed as evidence for manual review.")
