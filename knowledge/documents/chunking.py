"""Split a section's text into overlapping chunks that fit the embedding model's window.

MiniLM reads 256 wordpieces (about 1,000 characters of English); longer passages are silently
truncated when embedded. Chunks end at a paragraph or sentence boundary where one is near, and the
next chunk repeats the last ``overlap`` characters (whole sentences) so a statement cut by a
boundary is still whole in one chunk.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def chunk_text(text: str, max_chars: int = 900, overlap: int = 150) -> list[str]:
    """Chunks of at most ``max_chars`` characters, consecutive ones overlapping by up to ``overlap``.

    Raises:
        ValueError: ``max_chars`` < 100 or ``overlap`` not in [0, max_chars / 2].
    """
    if max_chars < 100 or not 0 <= overlap <= max_chars // 2:
        raise ValueError("max_chars must be >= 100 and overlap between 0 and max_chars / 2")
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    units = _units(text, max_chars)
    chunks: list[str] = []
    current: list[str] = []
    for unit in units:
        if current and len(" ".join([*current, unit])) > max_chars:
            chunks.append(" ".join(current))
            current = _tail(current, overlap)
            while current and len(" ".join([*current, unit])) > max_chars:
                current.pop(0)
        current.append(unit)
    if current:
        chunks.append(" ".join(current))
    return chunks


def _units(text: str, max_chars: int) -> list[str]:
    """Sentences (or paragraphs), with any longer than ``max_chars`` cut at word boundaries."""
    units: list[str] = []
    for piece in _SENTENCE_END.split(text):
        piece = " ".join(piece.split())
        while len(piece) > max_chars:
            cut = piece.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            units.append(piece[:cut].strip())
            piece = piece[cut:].strip()
        if piece:
            units.append(piece)
    return units


def _tail(units: list[str], overlap: int) -> list[str]:
    """The last whole units of a chunk whose joined length stays within ``overlap``."""
    tail: list[str] = []
    for unit in reversed(units):
        if len(" ".join([unit, *tail])) > overlap:
            break
        tail.insert(0, unit)
    return tail
