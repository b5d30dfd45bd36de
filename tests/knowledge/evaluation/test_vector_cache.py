"""``medbridge eval`` embeds each report once and, with a cache folder, never again on a rerun."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from knowledge.embedding import SentenceEmbedder
from knowledge.evaluation.vectors import embed_cached


class CountingEmbedder(SentenceEmbedder):
    """The real MiniLM, counting the texts it is asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.embedded = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded += len(texts)
        return super().embed(texts)


def test_a_rerun_reads_the_vectors_and_a_changed_text_is_embedded_again(tmp_path: Path) -> None:
    embedder = CountingEmbedder()
    texts = ["Findings: Lungs clear. Impression: Normal chest.", "Findings: Right effusion. Impression: Effusion."]
    first = embed_cached(embedder, texts, tmp_path)
    assert embedder.embedded == 2 and first.shape == (2, 384)
    again = embed_cached(embedder, texts, tmp_path)
    assert embedder.embedded == 2  # read from the cache
    np.testing.assert_array_equal(first, again)
    changed = embed_cached(embedder, [texts[0], "Findings: Left effusion. Impression: Effusion."], tmp_path)
    assert embedder.embedded == 4  # the chunk's texts changed: its vectors are not reused
    assert np.allclose(changed[0], first[0], atol=1e-5) and not np.allclose(changed[1], first[1], atol=1e-3)
    np.testing.assert_allclose(embed_cached(embedder, texts, None), first, atol=1e-5)  # no cache: same vectors
    assert embedder.embedded == 6
