"""MiniLM vectors of many texts, embedded once per evaluation and cached on disk between runs.

Embedding the Open-i reports is the evaluation's largest fixed cost (MiniLM runs ~20 reports/s on two CPU cores):
``medbridge eval`` embeds each report once and gives the same vectors to the retrieval section's knowledge base and
to the drafting index. The cache holds one ``.npy`` file per chunk of texts, named by a hash of the model folder
and the chunk's texts, so a changed text or model never reads a stale vector, and an interrupted run keeps the
chunks it finished (as ``bench/retrieval.py`` does).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from knowledge.embedding import SentenceEmbedder

log = logging.getLogger(__name__)

CHUNK = 512  # texts per cache file: small enough that an interrupted run loses little


def embed_cached(
    embedder: SentenceEmbedder,
    texts: Sequence[str],
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Unit vectors of ``texts`` (one row each, in order): chunks found in ``cache_dir`` are read, the others
    embedded and written there (atomically). ``cache_dir`` None embeds everything and writes nothing."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    parts: list[np.ndarray] = []
    for start in range(0, len(texts), CHUNK):
        chunk = list(texts[start : start + CHUNK])
        parts.append(_chunk_vectors(embedder, chunk, cache_dir))
        if progress is not None:
            progress(start + len(chunk), len(texts))
    return np.concatenate(parts)


def _chunk_vectors(embedder: SentenceEmbedder, chunk: list[str], cache_dir: Path | None) -> np.ndarray:
    if cache_dir is None:
        return embedder.embed(chunk)
    key = hashlib.sha256("\x1f".join([str(embedder.model_dir.resolve()), *chunk]).encode()).hexdigest()[:24]
    path = cache_dir / f"minilm-{key}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape[0] == len(chunk):
                return np.asarray(cached, dtype=np.float32)
        except (OSError, ValueError) as exc:  # a damaged file is embedded again and overwritten
            log.warning("vector cache file %s unreadable (%s): embedding again", path, exc)
    vectors = embedder.embed(chunk)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)  # a half-written file never passes for a cached chunk
    except OSError as exc:  # a read-only or full disk costs the next run time, never this run its result
        log.warning("cannot write the vector cache in %s (%s): the next run embeds again", cache_dir, exc)
    return vectors
