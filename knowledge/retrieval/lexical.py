"""A BM25 index (``bm25s``) over the passages of one Chroma collection.

bm25s indexes are immutable, so the index is rebuilt from the collection's documents whenever the
collection changed (the store tracks that); at the shipped 2,400 passages a rebuild takes a fraction
of a second. Tokens are lower-cased, English stop words removed and Snowball-stemmed (PyStemmer), so
"effusions" matches "effusion".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _stemmer():  # type: ignore[no-untyped-def]
    import Stemmer

    return Stemmer.Stemmer("english")


class LexicalIndex:
    """BM25 over ``texts`` keyed by ``ids`` (same order). An empty index answers nothing."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        import bm25s

        if len(ids) != len(texts):
            raise ValueError("ids and texts must have the same length")
        self.ids = list(ids)
        self._position = {pid: i for i, pid in enumerate(self.ids)}
        self._stem = _stemmer()
        self._bm25 = bm25s.BM25()
        self._indexed = False
        if self.ids:
            tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stem, show_progress=False)
            if tokens.vocab:  # bm25s cannot index a corpus without a single term
                self._bm25.index(tokens, show_progress=False)
                self._indexed = True

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, text: str, n: int, *, only: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Up to ``n`` ``(id, bm25 score)`` best first; passages that share no term are left out.

        Args:
            only: restrict the search to these ids (e.g. one source); unknown ids are ignored.
        """
        import bm25s

        if not self._indexed or n < 1 or not text.strip():
            return []
        tokens = bm25s.tokenize([text], stopwords="en", stemmer=self._stem, show_progress=False, return_ids=False)
        # Query terms the corpus never saw would fail the lookup; no known term means no match.
        known = [t for t in tokens[0] if t in self._bm25.vocab_dict]
        if not known:
            return []
        mask = None
        if only is not None:
            mask = np.zeros(len(self.ids), dtype=np.float32)
            mask[[self._position[p] for p in only if p in self._position]] = 1.0
        docs, scores = self._bm25.retrieve(
            [known], k=min(n, len(self.ids)), show_progress=False, weight_mask=mask, n_threads=1
        )
        return [(self.ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]
