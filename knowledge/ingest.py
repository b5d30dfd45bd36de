"""The default corpus: a clinically focused subset of ICD-10-CM plus MedBridge's own short notes.

Why a subset: embedding all 98,505 ICD-10-CM codes takes over ten minutes on two CPU cores, too
slow for a first start. The 3-character categories of every chapter except external causes
(about 1,680, broad coverage) plus the leaf codes of the conditions the demo works with (about
730) embed in under a minute and still let conclusions be coded precisely (E11.9, R91.1, N18.31).

Passage ids are stable (``icd10cm:E11.9``, ``note:type-2-diabetes:2``), so ingestion is idempotent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from knowledge.store import SOURCE_ICD10CM, SOURCE_NOTES, KnowledgeBase, Passage, icd10cm_passage_id

logger = logging.getLogger(__name__)

CORPUS_DIR = Path(__file__).with_name("corpus")

# ICD-10-CM blocks/categories whose every leaf code is ingested (besides all 3-character categories).
DEFAULT_ICD_ROOTS: tuple[str, ...] = (
    "E08-E13",  # diabetes mellitus
    "E66",  # overweight and obesity
    "E78",  # disorders of lipoprotein metabolism (hyperlipidaemia)
    "I10-I1A",  # hypertensive diseases
    "I50",  # heart failure
    "N18",  # chronic kidney disease
    "D50-D53",  # nutritional anaemias
    "D55-D59",  # haemolytic anaemias
    "D60-D64",  # aplastic and other anaemias
    "J09-J18",  # influenza and pneumonia
    "J44",  # COPD
    "J45",  # asthma
    "R91",  # abnormal findings on diagnostic imaging of lung (incl. solitary pulmonary nodule)
    "C34",  # malignant neoplasm of bronchus and lung
    "D14.3",  # benign neoplasm of bronchus and lung
)


_EXCLUDED_CATEGORY_LETTERS = frozenset("VWXY")


def _icd_text(code: str, description: str, parent: str | None, parent_description: str | None) -> str:
    text = f"ICD-10-CM {code}: {description}."
    if parent and parent_description:
        text += f" Parent: {parent} {parent_description}."
    return text


def icd10cm_passages(roots: Iterable[str] = DEFAULT_ICD_ROOTS, *, include_categories: bool = True) -> list[Passage]:
    """ICD-10-CM passages: every 3-character category (unless disabled) plus every leaf under ``roots``.

    Raises:
        ValueError: a root is not a valid ICD-10-CM code, block or category.
    """
    import simple_icd_10_cm as icd

    selected: dict[str, None] = {}  # ordered set
    if include_categories:
        for code in icd.get_all_codes(with_dots=True):
            # External causes (V00-Y99) describe how an injury happened, never a diagnosis to
            # conclude; leaving them out saves about 10% of the embedding time.
            if icd.is_category(code) and code[0] not in _EXCLUDED_CATEGORY_LETTERS:
                selected[code] = None
    for root in roots:
        if not icd.is_valid_item(root):
            raise ValueError(f"{root!r} is not an ICD-10-CM code or block")
        for code in [root, *icd.get_descendants(root)]:
            if icd.is_leaf(code) and not icd.is_chapter_or_block(code):
                selected[code] = None
    passages: list[Passage] = []
    for code in selected:
        description = icd.get_description(code)
        parent = icd.get_parent(code) or None
        parent_description = icd.get_description(parent) if parent else None
        passages.append(
            Passage(
                id=icd10cm_passage_id(code),
                source=SOURCE_ICD10CM,
                # The title is the bare description so embedding_text() sees it inside the text and
                # embeds the text alone: half the tokens, and ingestion time is dominated by embedding.
                title=description,
                text=_icd_text(code, description, parent, parent_description),
                code=code,
            )
        )
    return passages


def _split_note(stem: str, markdown: str, max_chars: int) -> list[Passage]:
    lines = markdown.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"note {stem!r} must start with a '# Title' line")
    title = lines[0][2:].strip()
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in lines[1:]:
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        else:
            sections[-1][1].append(line)
    passages: list[Passage] = []
    for heading, body in sections:
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", "\n".join(body)) if p.strip()]
        # Whole sections read best; long ones are split by paragraph so each passage stays
        # within the embedding model's 256-wordpiece window.
        chunks: list[str] = []
        for para in paragraphs:
            if chunks and len(chunks[-1]) + len(para) + 2 <= max_chars:
                chunks[-1] += "\n\n" + para
            else:
                chunks.append(para)
        for chunk in chunks:
            passages.append(
                Passage(
                    id=f"note:{stem}:{len(passages)}",
                    source=SOURCE_NOTES,
                    title=f"{title}: {heading}" if heading else title,
                    text=chunk,
                )
            )
    return passages


def note_passages(corpus_dir: Path = CORPUS_DIR, *, max_chars: int = 900) -> list[Passage]:
    """Passages from every ``*.md`` note in ``corpus_dir`` (one per section, long ones per paragraph).

    Raises:
        ValueError: a note lacks its ``# Title`` first line.
    """
    passages: list[Passage] = []
    for path in sorted(Path(corpus_dir).glob("*.md")):
        passages.extend(_split_note(path.stem, path.read_text(encoding="utf-8"), max_chars))
    return passages


def default_corpus(*, icd_roots: Iterable[str] = DEFAULT_ICD_ROOTS, corpus_dir: Path = CORPUS_DIR) -> list[Passage]:
    """The notes followed by the ICD-10-CM subset (about 2,400 passages)."""
    return [*note_passages(corpus_dir), *icd10cm_passages(icd_roots)]


def ingest_default_corpus(kb: KnowledgeBase) -> int:
    """Bring ``kb`` up to date with the default corpus; safe to run on every start.

    Notes that were removed or shortened since the last run are deleted, so stale text is never
    retrieved. Returns the number of passages written (0 when already up to date; about 30 s for a
    first ingestion on two CPU cores).
    """
    corpus = default_corpus()
    note_ids = {p.id for p in corpus if p.source == SOURCE_NOTES}
    stale = sorted(kb.ids(source=SOURCE_NOTES) - note_ids)
    kb.delete(stale)
    written = kb.add(corpus)
    logger.info("knowledge base: %d passages written, %d stale removed, %d total", written, len(stale), kb.count())
    return written
