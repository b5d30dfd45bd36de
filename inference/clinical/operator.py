"""Retrieval-augmented clinical impression: a pure operator over a knowledge base and a local LLM.

``ClinicalImpressionOperator.run(ctx)`` retrieves reference passages for a patient's conditions
and abnormal observations, fits as many as the model's context allows into a prompt made only of
de-identified facts (age, sex, coded items, values), generates a short impression and records
which passages the output cites. It touches no files, Kafka or database; the caller owns I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from knowledge.embedding import SentenceEmbedder
from knowledge.generation.protocol import ChatMessage, TextGenerator
from knowledge.grounding import GroundingChecker, no_supported_sentence_text, parse_citations
from knowledge.store import SOURCE_ICD10CM, SOURCE_NOTES, KnowledgeBase, RetrievedPassage, icd10cm_passage_id
from schemas.clinical import CodedItem, ImpressionGrounding, ObservationItem, PatientContext
from schemas.events import EvidencePassage

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a clinical decision-support assistant. Write a short clinical impression (2 to 4 "
    "sentences) for a reviewing clinician. Use only the patient facts and the numbered reference "
    "passages below. Cite the passages you rely on by number in square brackets, like [1] or [2][3]. "
    "Do not invent findings; if the facts are not enough for a conclusion, say so."
)

# A fictitious worked example, shown before every request (see build_messages).
ONE_SHOT_REQUEST = (
    "Patient: 70-year-old male.\nConditions: Essential (primary) hypertension (ICD-10-CM I10).\n"
    "Observations: Blood pressure 162/98 mmHg (high).\n\n"
    "Reference passages:\n[1] ICD-10-CM I10: Essential (primary) hypertension.\n"
    "[2] Hypertension stages: stage 2 hypertension is a systolic pressure of 140 mmHg or more "
    "or a diastolic pressure of 90 mmHg or more.\n\n"
    "Write the clinical impression, citing passages as [n]."
)
ONE_SHOT_ANSWER = (
    "A blood pressure of 162/98 mmHg meets the threshold for stage 2 hypertension [2], consistent with "
    "the recorded essential hypertension [1]. Review of treatment is suggested."
)

EMPTY_OUTPUT_TEXT = (
    "The language model returned no text for this record, so no impression was generated. "
    "The retrieved reference passages are listed as evidence for manual review."
)
NO_CONTENT_TEXT = "The record holds no conditions, observations or medications, so no impression was generated."

# Tokens kept free besides the answer: tokenisation of the final prompt can differ by a few
# tokens from the sum of its parts, and some models append an end-of-turn token.
PROMPT_MARGIN_TOKENS = 16
# A passage cut to fewer tokens than this carries no usable meaning; drop it instead.
MIN_PASSAGE_TOKENS = 24
# Cap per section so one patient with hundreds of observations cannot crowd out the evidence.
MAX_ITEMS_PER_SECTION = 20
# The answer may grow to this multiple of max_new_tokens where the prompt leaves room: 4 of 5 drafts
# stopped mid-sentence at 160 tokens (issue 18), and the room is there once the passages are fitted.
RAISED_LIMIT_FACTOR = 2
# Decoding then re-encoding an answer can differ by a token or two from what was generated.
LIMIT_SLACK_TOKENS = 2

_NORMAL_INTERPRETATIONS = {"n", "normal", "within normal limits", "wnl", "negative", "neg"}


class ClinicalOperatorError(Exception):
    """The operator cannot build a prompt for this input (e.g. the patient facts alone overflow)."""


class ClinicalImpression(BaseModel):
    """Result of one run.

    ``evidence`` holds every passage the model was given (in prompt order, numbered from 1), with
    ``cited=True`` for those its output cites. ``conclusion_codes`` are ICD-10-CM (code, display)
    pairs taken from cited ICD passages or, when none is cited, from retrieved ICD passages whose
    code equals one of the patient's coded conditions; never invented. ``generated`` is False when
    no model text backs ``impression`` (empty output, nothing to assess, or no drafted sentence
    supported by its citations). ``grounding`` holds the draft's sentences and their support; the
    impression text is the draft with invalid citations removed and a cut last sentence trimmed.
    """

    model_config = ConfigDict(frozen=True)

    impression: str
    evidence: list[EvidencePassage]
    model_name: str
    conclusion_codes: list[tuple[str, str]] = Field(default_factory=list)
    generated: bool = True
    prompt_tokens: int = 0
    passages_dropped: int = 0
    grounding: ImpressionGrounding | None = None
    generated_tokens: int = 0  # the draft's length and the time it took (the LLM throughput metrics)
    generation_seconds: float = 0.0


class PreparedPrompt(BaseModel):
    """The exact prompt for one run and the passages in it (numbered from 1)."""

    model_config = ConfigDict(frozen=True)

    messages: list[ChatMessage]
    passages: list[RetrievedPassage]
    prompt_tokens: int
    passages_dropped: int
    # the patient's coded conditions: the only codes a conclusion may carry when nothing is cited
    patient_codes: list[str] = Field(default_factory=list)


def _is_abnormal(obs: ObservationItem) -> bool | None:
    if obs.interpretation is None:
        return None
    return obs.interpretation.strip().lower() not in _NORMAL_INTERPRETATIONS


def _coded_line(item: CodedItem) -> str:
    # The code is clinical content, not an identifier; the FHIR reference (item.ref) never enters.
    if item.code and item.system and "icd-10" in item.system.lower():
        return f"- {item.display} (ICD-10-CM {item.code})"
    return f"- {item.display}"


def _observation_line(obs: ObservationItem) -> str:
    # Effective dates are left out on purpose: full dates tied to a person are identifiers under
    # HIPAA Safe Harbor, and the impression does not need them.
    line = f"- {obs.display}"
    if obs.value:
        line += f": {obs.value}" + (f" {obs.unit}" if obs.unit else "")
    if obs.interpretation:
        line += f" ({obs.interpretation})"
    return line


def _passage_line(p: RetrievedPassage) -> str:
    # ICD passages already name their code and description; repeating the title wastes context.
    return p.text if p.title in p.text else f"{p.source}, {p.title}: {p.text}"


def _normalise_code(code: str) -> str:
    return code.replace(".", "").strip().upper()


def patient_facts(ctx: PatientContext) -> str:
    """The de-identified patient facts given to the model.

    Only age (90 and over grouped, as HIPAA Safe Harbor requires), sex and the displays, codes,
    values, units and interpretations of conditions, observations and medications. Never
    ``patient_ref``, FHIR references, names, identifiers or dates.
    """
    if ctx.age_years is None:
        age = "unknown age"
    elif ctx.age_years >= 90:
        age = "aged 90 or older"
    else:
        age = f"{ctx.age_years}-year-old"
    lines = [f"Patient: {age} {ctx.sex or 'sex not recorded'}".strip()]
    sections: list[tuple[str, list[str]]] = [
        ("Conditions", [_coded_line(c) for c in ctx.conditions]),
        # Abnormal results first: they matter most when the section is capped.
        (
            "Observations",
            [_observation_line(o) for o in sorted(ctx.observations, key=lambda o: _is_abnormal(o) is not True)],
        ),
        ("Medications", [_coded_line(m) for m in ctx.medications]),
    ]
    for name, items in sections:
        if items:
            lines.append(f"{name}:")
            lines.extend(items[:MAX_ITEMS_PER_SECTION])
            if len(items) > MAX_ITEMS_PER_SECTION:
                lines.append(f"- ... and {len(items) - MAX_ITEMS_PER_SECTION} more")
    return "\n".join(lines)


class RetrievalQuery(BaseModel):
    """One knowledge-base query: its text and, optionally, the only source it searches."""

    model_config = ConfigDict(frozen=True)

    text: str
    source: str | None = None


def retrieval_queries(ctx: PatientContext) -> list[RetrievalQuery]:
    """Knowledge-base queries for ``ctx``, most general first.

    One combined query over everything (conditions, abnormal observations, medications); one per
    condition over ICD-10-CM only, so each condition gets candidate codes; one per abnormal
    observation over the notes only, because observation wording ("Hemoglobin A1c 8.2 %")
    otherwise matches unrelated code descriptions (haemoglobinopathies). Observations with no
    interpretation are kept (their abnormality is unknown); those marked normal are left out.
    """
    conditions = [c.display for c in ctx.conditions]
    obs_texts = [
        " ".join(f"{o.display} {o.value or ''} {o.unit or ''} {o.interpretation or ''}".split())
        for o in ctx.observations
        if _is_abnormal(o) is not False
    ]
    meds = [m.display for m in ctx.medications]
    queries = [
        RetrievalQuery(text="; ".join([*conditions, *obs_texts, *meds])),
        *(RetrievalQuery(text=c, source=SOURCE_ICD10CM) for c in conditions),
        *(RetrievalQuery(text=o, source=SOURCE_NOTES) for o in obs_texts),
    ]
    unique: dict[RetrievalQuery, None] = {}  # ordered set
    for q in queries:
        if q.text.strip():
            unique[q] = None
    return list(unique)


class ClinicalImpressionOperator:
    """Knowledge-grounded clinical impression for one patient context.

    Args:
        kb: an opened, populated knowledge base.
        llm: a loaded text generator.
        k: maximum passages retrieved and offered to the model (fewer when the context is small).
        max_new_tokens: length limit of the impression, raised up to ``RAISED_LIMIT_FACTOR`` times
            where the fitted prompt leaves room.
        grounder: the support check of each drafted sentence; default MiniLM from the knowledge base's
            own embedding folder.

    ``run`` is blocking (retrieval + generation, seconds on CPU); async callers run it in a thread.
    ``prepare`` touches the knowledge base and runs one at a time; ``complete`` may run in up to
    ``llm.max_concurrency`` threads at once.
    """

    def __init__(
        self,
        kb: KnowledgeBase,
        llm: TextGenerator,
        *,
        k: int = 6,
        max_new_tokens: int = 160,
        grounder: GroundingChecker | None = None,
    ) -> None:
        if k < 1 or max_new_tokens < 1:
            raise ValueError("k and max_new_tokens must be >= 1")
        if max_new_tokens + PROMPT_MARGIN_TOKENS >= llm.context_length:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                f"{llm.context_length}-token context of {llm.model_name}"
            )
        self.kb = kb
        self.llm = llm
        self.k = k
        self.max_new_tokens = max_new_tokens
        self.grounder = grounder or GroundingChecker(SentenceEmbedder(kb.embedding_model))

    @property
    def prompt_budget(self) -> int:
        """Maximum prompt tokens: the context minus the answer and a safety margin."""
        return self.llm.context_length - self.max_new_tokens - PROMPT_MARGIN_TOKENS

    def retrieve(self, ctx: PatientContext) -> list[RetrievedPassage]:
        """Up to ``k`` passages, best first.

        The ICD-10-CM passages of the patient's own coded conditions come first (score 1.0: an
        exact match, not a similarity), then the best hits of each query interleaved, so every
        condition and abnormal observation is represented before any gets a second passage.
        """
        exact_ids = [
            icd10cm_passage_id(c.code)
            for c in ctx.conditions
            if c.code and (c.system is None or "icd-10" in c.system.lower())
        ]
        exact = [RetrievedPassage(**p.model_dump(), score=1.0) for p in self.kb.get(exact_ids)]
        results = [exact, *(self.kb.query(q.text, self.k, source=q.source) for q in retrieval_queries(ctx))]
        best: dict[str, RetrievedPassage] = {}
        order: list[str] = []
        for rank in range(self.k):
            for hits in results:
                if rank < len(hits):
                    p = hits[rank]
                    if p.id not in best:
                        order.append(p.id)
                    if p.id not in best or p.score > best[p.id].score:
                        best[p.id] = p
        return [best[i] for i in order[: self.k]]

    def build_messages(
        self, ctx: PatientContext, passages: Sequence[RetrievedPassage], *, one_shot: bool = True
    ) -> list[ChatMessage]:
        """System message, one worked example (one-shot), then the patient's request; passages are
        numbered from 1 in the given order. The example is what makes small and non-instruction-tuned
        models (Meditron-7B is a pretrained Llama-2) answer briefly and cite as [n]."""
        refs = "\n".join(f"[{i}] {_passage_line(p)}" for i, p in enumerate(passages, 1))
        user = (
            f"{patient_facts(ctx)}\n\n"
            f"Reference passages:\n{refs if refs else '(none)'}\n\n"
            "Write the clinical impression, citing passages as [n]."
        )
        example: list[ChatMessage] = [
            {"role": "user", "content": ONE_SHOT_REQUEST},
            {"role": "assistant", "content": ONE_SHOT_ANSWER},
        ]
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            *(example if one_shot else []),
            {"role": "user", "content": user},
        ]

    def fit_passages(self, ctx: PatientContext, passages: Sequence[RetrievedPassage]) -> PreparedPrompt:
        """Fit the prompt into ``prompt_budget``: drop lowest-ranked passages, then truncate the last.
        The worked example goes first when even one passage would not fit beside it: evidence matters more.

        Raises:
            ClinicalOperatorError: the instructions and patient facts alone do not fit.
        """
        with_example = self._fit(ctx, passages, one_shot=True)
        if with_example is not None and (with_example.passages or not passages):
            return with_example
        without = self._fit(ctx, passages, one_shot=False)
        if without is None:
            used = self.llm.count_prompt_tokens(self.build_messages(ctx, [], one_shot=False))
            raise ClinicalOperatorError(
                f"the instructions and patient facts need {used} tokens, more than the {self.prompt_budget}-token "
                f"prompt budget of {self.llm.model_name} (context {self.llm.context_length}, "
                f"max_new_tokens {self.max_new_tokens}); lower max_new_tokens or use a larger model"
            )
        return without

    def _fit(
        self, ctx: PatientContext, passages: Sequence[RetrievedPassage], *, one_shot: bool
    ) -> PreparedPrompt | None:
        kept = list(passages)
        budget = self.prompt_budget
        while True:
            messages = self.build_messages(ctx, kept, one_shot=one_shot)
            used = self.llm.count_prompt_tokens(messages)
            if used <= budget:
                return PreparedPrompt(
                    messages=messages,
                    passages=kept,
                    prompt_tokens=used,
                    passages_dropped=len(passages) - len(kept),
                )
            if not kept:
                return None
            if len(kept) > 1:
                kept.pop()
                continue
            # One passage left and still too long: cut its text rather than lose all evidence.
            only = kept[0]
            room = self.llm.count_tokens(only.text) - (used - budget) - 4
            if room < MIN_PASSAGE_TOKENS:
                kept.pop()
                continue
            cut = self.llm.truncate_to_tokens(only.text, room).rstrip() + " ..."
            kept[0] = only.model_copy(update={"text": cut})

    def generation_limit(self, prepared: PreparedPrompt) -> int:
        """New tokens for this prompt: ``max_new_tokens`` raised up to ``RAISED_LIMIT_FACTOR`` times where the
        context has room beside the fitted prompt, so fewer answers are cut mid-sentence."""
        room = self.llm.context_length - prepared.prompt_tokens - PROMPT_MARGIN_TOKENS
        return max(self.max_new_tokens, min(self.max_new_tokens * RAISED_LIMIT_FACTOR, room))

    def prepare(self, ctx: PatientContext) -> PreparedPrompt:
        """Retrieve and fit: the exact prompt ``run`` would send, without generating."""
        prepared = self.fit_passages(ctx, self.retrieve(ctx))
        return prepared.model_copy(update={"patient_codes": [c.code for c in ctx.conditions if c.code]})

    def run(self, ctx: PatientContext) -> ClinicalImpression:
        """Generate a clinical impression for ``ctx``.

        Returns a result with ``generated=False`` and an explanatory ``impression`` when the
        context has no clinical content (the model is not called) or the model returned nothing.

        Raises:
            ClinicalOperatorError: the patient facts alone overflow the model's context.
            knowledge.store.KnowledgeBaseError: retrieval failed.
            knowledge.generation.protocol.LLMError: generation failed.
        """
        if not ctx.has_clinical_content():
            return ClinicalImpression(
                impression=NO_CONTENT_TEXT, evidence=[], model_name=self.llm.model_name, generated=False
            )
        return self.complete(self.prepare(ctx))

    def complete(self, prepared: PreparedPrompt) -> ClinicalImpression:
        """Generate from a prompt ``prepare`` built, and record what the output cites.

        Split from ``run`` so a worker can serialise retrieval (CPU-bound, in this process) while
        several generations wait on a model server at once.

        Raises:
            knowledge.generation.protocol.LLMError: generation failed.
        """
        # Counts only: the prompt and output hold clinical details and stay out of the logs.
        logger.debug(
            "clinical impression: %d passages (%d dropped), %d prompt tokens",
            len(prepared.passages),
            prepared.passages_dropped,
            prepared.prompt_tokens,
        )
        limit = self.generation_limit(prepared)
        began = time.perf_counter()
        draft = self.llm.generate(prepared.messages, limit).strip()
        seconds = time.perf_counter() - began
        draft_tokens = self.llm.count_tokens(draft) if draft else 0
        hit_limit = draft_tokens >= limit - LIMIT_SLACK_TOKENS if draft else False
        output, grounding = self.grounder.ground(
            draft, [_passage_line(p) for p in prepared.passages], hit_limit=hit_limit
        )
        logger.debug(
            "grounding: %d/%d sentences supported, %d citations removed, truncated=%s",
            grounding.supported_count, len(grounding.sentences), grounding.citations_removed, grounding.truncated,
        )
        if not draft:
            impression = EMPTY_OUTPUT_TEXT
        elif grounding.supported_count == 0:
            # Invented text must not read as an impression; the sentences stay in ``grounding``, marked.
            impression = no_supported_sentence_text(grounding)
        else:
            impression = output
        # Passages count as cited only when the text presented cites them: an unsupported draft is not presented.
        presented = bool(draft) and grounding.supported_count > 0
        cited = parse_citations(output, len(prepared.passages)) if presented else set()
        evidence = [
            EvidencePassage(
                passage_id=p.id,
                source=p.source,
                title=p.title,
                text=p.text,
                score=p.score,
                cited=i in cited,
                code=p.code,
            )
            for i, p in enumerate(prepared.passages, 1)
        ]
        return ClinicalImpression(
            impression=impression,
            evidence=evidence,
            model_name=self.llm.model_name,
            conclusion_codes=self._conclusion_codes(prepared.patient_codes, evidence),
            generated=presented,
            prompt_tokens=prepared.prompt_tokens,
            passages_dropped=prepared.passages_dropped,
            grounding=grounding if draft else None,
            generated_tokens=draft_tokens,
            generation_seconds=seconds,
        )

    @staticmethod
    def _conclusion_codes(patient_codes: Sequence[str], evidence: Sequence[EvidencePassage]) -> list[tuple[str, str]]:
        icd = [e for e in evidence if e.source == SOURCE_ICD10CM and e.code]
        chosen = [e for e in icd if e.cited]
        if not chosen:
            # Nothing cited: only codes that both the record and the retrieval support.
            codes = {_normalise_code(c) for c in patient_codes}
            chosen = [e for e in icd if _normalise_code(e.code or "") in codes]
        out: list[tuple[str, str]] = []
        for e in chosen:
            pair = (e.code or "", e.title)
            if pair not in out:
                out.append(pair)
        return out
