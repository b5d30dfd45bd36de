"""Dense retrieval: HNSW recall against exact search, and query latency, at 100,000 passages.

    PYTHONPATH=$PWD .venv/bin/python bench/retrieval.py                    # 100,000 real passages, 200 queries
    PYTHONPATH=$PWD .venv/bin/python bench/retrieval.py --embed-only       # fill the embedding cache, stop
    PYTHONPATH=$PWD .venv/bin/python bench/retrieval.py --data synthetic   # quick: Gaussian-mixture vectors

Real text (the default): the passages are every ICD-10-CM description that `simple-icd-10-cm` ships
(98,505 codes, chapters and blocks included; 97,729 distinct texts), MedBridge's own notes
(knowledge/corpus) and sentences of the Open-i chest X-ray reports (knowledge.evaluation.openi) to
reach n, embedded with the knowledge base's own MiniLM (knowledge.embedding.SentenceEmbedder). The
queries are held out of the index: half are ICD-10-CM descriptions of leaf codes whose siblings are
indexed (the near-duplicate neighbourhoods where a graph search loses neighbours), half are Open-i
sentences. Embedding 100,000 passages takes tens of minutes on two CPU cores, so the vectors are
cached as .npy files in --cache-dir (default: $TMPDIR/medbridge-bench), one per chunk of 4,096 texts,
named by a hash of the model folder and the chunk's texts: a rerun or an interrupted run only embeds
what is missing.

Synthetic (--data synthetic): 384-dimensional unit vectors drawn around n/50 random topic centres (a
Gaussian mixture, cosine to the own centre about 0.78, to another topic's passages about 0); queries
come from the same mixture. It builds in seconds but is easier than real text (recall 1.000 at
10,000 for every configuration).

Exact search is a numpy scan of the same vectors. A returned passage counts towards recall@10 when its
similarity reaches the exact 10th best (ann-benchmarks' rule, so identical texts tie instead of
counting as misses). Both collections are real persistent Chroma collections in a temporary folder:
one with Chroma's defaults (M 16, ef_construction 100, ef_search 100), one as MedBridge creates them
(knowledge.store.HNSW_*, or --m/--ef-construction to try others). Chroma (1.5) reads ef_search only
when a process loads the index: changing it on an open collection is stored but not used until the
next process opens the collection (chroma-core/chroma#4097). So each ef_search of the sweep is set
and measured in a fresh process (KnowledgeBase(search_ef=...)) on the persisted collection.

The `source` filter: synthetic passages carry source "notes" (4%, the shipped corpus' proportion) or
"icd"; real ones "icd" (ICD-10-CM) or "notes" (notes and Open-i sentences). Chroma's `where` filter is
timed against KnowledgeBase.nearest, which searches unfiltered for 4k and keeps the source's hits,
falling back to the filter when too few.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread: a single query's scan is too small to share, and spinning threads would slow Chroma.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIM = 384
K = 10
SPREAD = 0.8  # noise norm against the unit centre: cosine to the centre ~0.78
CHUNK = 4096  # texts per cached embedding file
# Ties: a returned passage at the exact 10th similarity counts (float32 rounding differs by path).
TIE = 1e-5


@dataclass(frozen=True)
class Dataset:
    """Unit vectors of the indexed passages and of the held-out queries, and each passage's source."""

    description: str
    vectors: np.ndarray
    queries: np.ndarray
    sources: list[str]


def mixture(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    x = centres[picks] + rng.normal(0.0, spread / np.sqrt(DIM), (n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_dataset(n: int, queries: int) -> Dataset:
    rng = np.random.default_rng(18)
    centres = rng.normal(size=(max(1, n // 50), DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = mixture(rng, n, centres, SPREAD)
    sources = np.where(rng.random(n) < 0.04, "notes", "icd").tolist()
    return Dataset(f"{n:,} synthetic 384-d passages", vectors, mixture(rng, queries, centres, SPREAD), sources)


def openi_sentences() -> list[str]:
    """Distinct sentences (four words or more) of the Open-i findings and impressions, in a fixed order."""
    from knowledge.evaluation.openi import load_reports

    seen: dict[str, None] = {}
    for report in load_reports(keep="any text"):  # de-identification masks ("XXXX") already removed
        for part in (report.findings, report.impression):
            for sentence in re.split(r"(?<=[.!?])\s+", part):
                if len(sentence.split()) >= 4:
                    seen.setdefault(sentence.strip(), None)
    return list(seen)


def real_texts(n: int, queries: int) -> tuple[list[str], list[str], list[str]]:
    """(passage texts, their sources, query texts): ICD-10-CM, then notes and Open-i sentences up to ``n``.

    Raises:
        SystemExit: fewer distinct texts than ``n`` plus the queries.
    """
    import simple_icd_10_cm as icd

    from knowledge.ingest import note_passages

    rng = random.Random(18)
    descriptions: dict[str, str] = {}  # text -> code; identical descriptions are embedded once
    for code in icd.get_all_codes(with_dots=True):
        descriptions.setdefault(icd.get_description(code), code)
    # Held out: leaf codes whose description no other code shares, so the query text is not indexed.
    leaves = sorted(t for t, c in descriptions.items() if icd.is_leaf(c) and not icd.is_chapter_or_block(c))
    icd_queries = rng.sample(leaves, queries // 2)
    sentences = openi_sentences()
    sentence_queries = rng.sample(sentences, queries - len(icd_queries))
    held_out = {*icd_queries, *sentence_queries}
    icd_texts = [t for t in descriptions if t not in held_out]
    others = [p.embedding_text() for p in note_passages()] + [s for s in sentences if s not in held_out]
    if len(icd_texts) >= n:
        texts, sources = icd_texts[:n], ["icd"] * n
    elif len(icd_texts) + len(others) >= n:
        fill = n - len(icd_texts)
        texts, sources = icd_texts + others[:fill], ["icd"] * len(icd_texts) + ["notes"] * fill
    else:
        raise SystemExit(f"only {len(icd_texts) + len(others):,} distinct passages: ask for --n below that")
    return texts, sources, [*icd_queries, *sentence_queries]


def embed_cached(texts: Sequence[str], cache_dir: Path, threads: int) -> np.ndarray:
    """Unit MiniLM vectors of ``texts``; chunks already in ``cache_dir`` are read, the rest embedded and saved."""
    import torch

    from knowledge.embedding import SentenceEmbedder

    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)  # the OMP_NUM_THREADS=1 above is for the query timings
    embedder: SentenceEmbedder | None = None
    parts: list[np.ndarray] = []
    started, done = time.perf_counter(), 0
    for start in range(0, len(texts), CHUNK):
        chunk = list(texts[start : start + CHUNK])
        if embedder is None:
            embedder = SentenceEmbedder()
        key = hashlib.sha256("\x1f".join([embedder.model_dir.name, *chunk]).encode()).hexdigest()[:20]
        path = cache_dir / f"minilm-{key}.npy"
        if path.is_file():
            parts.append(np.load(path))
            continue
        vectors = embedder.embed(chunk).astype(np.float32)
        np.save(path.with_suffix(".tmp.npy"), vectors)
        path.with_suffix(".tmp.npy").rename(path)  # an interrupted save never passes for a cached chunk
        parts.append(vectors)
        done += len(chunk)
        elapsed = time.perf_counter() - started
        print(f"  embedded {start + len(chunk):,}/{len(texts):,} ({done / elapsed:.0f} texts/s)", flush=True)
    return np.concatenate(parts) if parts else np.zeros((0, DIM), dtype=np.float32)


def real_dataset(n: int, queries: int, cache_dir: Path, threads: int) -> Dataset:
    texts, sources, query_texts = real_texts(n, queries)
    started = time.perf_counter()
    query_vectors = embed_cached(query_texts, cache_dir, threads)
    vectors = embed_cached(texts, cache_dir, threads)
    icd_count = sources.count("icd")
    print(f"embeddings ready in {time.perf_counter() - started:.0f} s (cache: {cache_dir})", flush=True)
    description = (
        f"{n:,} real passages ({icd_count:,} ICD-10-CM descriptions, {n - icd_count:,} notes and Open-i "
        f"sentences), MiniLM-L6 384-d"
    )
    return Dataset(description, vectors, query_vectors, sources)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ vectors.T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def load(collection, vectors: np.ndarray, sources: Sequence[str]) -> float:  # noqa: ANN001 - chromadb Collection
    start = time.perf_counter()
    for i in range(0, len(vectors), 5000):
        collection.add(
            ids=[str(j) for j in range(i, min(i + 5000, len(vectors)))],
            embeddings=vectors[i : i + 5000],
            metadatas=[{"source": s} for s in sources[i : i + 5000]],
        )
    return time.perf_counter() - start


def timed(fn: Callable[[np.ndarray], list[str]], queries: np.ndarray) -> tuple[list[list[str]], float]:
    got, times = [], []
    for q in queries:
        start = time.perf_counter()
        got.append(fn(q))
        times.append(time.perf_counter() - start)
    return got, statistics.median(times) * 1000


def recall(got: list[list[str]], truth: np.ndarray, vectors: np.ndarray, queries: np.ndarray) -> tuple[float, float]:
    """(recall@K, top-1 agreement): a hit is a returned passage as similar as the exact K-th (or 1st) best."""
    r, top1 = [], []
    for g, row, q in zip(got, truth, queries, strict=True):
        sims = vectors[[int(i) for i in g[:K]]] @ q if g else np.zeros(0)
        kth, best = float(vectors[row[K - 1]] @ q), float(vectors[row[0]] @ q)
        r.append(min(K, int(np.sum(sims >= kth - TIE))) / K)
        top1.append(bool(len(sims)) and float(sims[0]) >= best - TIE)
    return float(np.mean(r)), float(np.mean(top1))


def sweep_probe(path: str, ef: int, queries: np.ndarray) -> tuple[list[list[str]], float]:
    """Open MedBridge's persisted collection with ``ef`` in this (fresh) process and time the queries."""
    from knowledge.store import KnowledgeBase

    kb = KnowledgeBase(Path(path), collection="bench", search_ef=ef)
    kb.nearest(queries[0].tolist(), K)  # loads the index (with ef) outside the timing
    return timed(lambda q: [pid for pid, _ in kb.nearest(q.tolist(), K)], queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("real", "synthetic"), default="real")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef", default="50,100,200,400", help="ef_search values swept on MedBridge's collection")
    parser.add_argument("--m", type=int, help="HNSW M of MedBridge's collection (default knowledge.store.HNSW_M)")
    parser.add_argument("--ef-construction", type=int, help="its ef_construction (default HNSW_EF_CONSTRUCTION)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "medbridge-bench")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for embedding")
    parser.add_argument("--embed-only", action="store_true", help="fill the embedding cache and stop")
    parser.add_argument("--skip-defaults", action="store_true", help="no collection with Chroma's defaults")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.data == "real":
        data = real_dataset(args.n, args.queries, args.cache_dir, args.threads)
    else:
        data = synthetic_dataset(args.n, args.queries)
    if args.embed_only:
        return

    import chromadb
    from chromadb.config import Settings

    from knowledge.store import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, KnowledgeBase

    m = args.m or HNSW_M
    ef_construction = args.ef_construction or HNSW_EF_CONSTRUCTION
    vectors, queries, sources = data.vectors, data.queries, data.sources
    truth = exact_top(vectors, queries, K)

    print(f"{data.description}, {len(queries)} queries, k={K}; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"| {'collection':<34} | {'search':<28} | recall@10 | top-1 same | ms/query (p50) |")
    print(f"|{'-' * 36}|{'-' * 30}|-----------|------------|----------------|", flush=True)
    _, exact_ms = timed(lambda q: [str(i) for i in exact_top(vectors, q[None, :], K)[0]], queries)

    def row(config: str, search: str, got: list[list[str]], ms: float, where: np.ndarray | None = None) -> None:
        # Rows print as they are measured: a 100,000-passage build takes minutes on a busy machine.
        if where is None:
            r, t1 = recall(got, truth, vectors, queries)
        else:  # restricted to a source: the exact truth is that source's own top K
            r, t1 = recall(got, where[exact_top(vectors[where], queries, K)], vectors, queries)
        print(f"| {config:<34} | {search:<28} | {r:9.4f} | {t1:10.3f} | {ms:7.2f} ({ms / exact_ms:.2f}x) |", flush=True)

    print(f"| {'numpy exact scan (baseline)':<34} | {'-':<28} | {1.0:9.4f} | {1.0:10.3f} | {exact_ms:7.2f} (1.00x) |")
    with tempfile.TemporaryDirectory() as tmp:
        # MedBridge's collection: created by KnowledgeBase; the vectors go in directly (no text to embed).
        kb = KnowledgeBase(
            Path(tmp) / "medbridge", collection="bench", construction_ef=ef_construction, max_neighbors=m
        )
        build_ours = load(kb._collection, vectors, sources)  # noqa: SLF001 - bulk vectors, bench only
        ours_name = f"MedBridge (M {m}, ef_c {ef_construction})"
        # A fresh process per ef_search: Chroma applies a changed ef_search only when it loads the index.
        spawn = multiprocessing.get_context("spawn")
        for ef in sorted({int(e) for e in args.ef.split(",")}):
            with spawn.Pool(1) as pool:
                got, ms = pool.apply(sweep_probe, (str(Path(tmp) / "medbridge"), ef, queries))
            row(ours_name, f"ef_search {ef} (new process)", got, ms)
        kb.set_search_ef(HNSW_EF_SEARCH)  # the sweep stored its last value; this process still uses its own

        for source in ("icd", "notes"):
            in_source = np.flatnonzero(np.asarray(sources) == source)
            if len(in_source) < K:
                continue

            def where_filter(q: np.ndarray, source: str = source) -> list[str]:
                res = kb._collection.query(  # noqa: SLF001 - the plain filter, as before
                    query_embeddings=[q], n_results=K, where={"source": source}, include=[]
                )
                return res["ids"][0]

            def nearest(q: np.ndarray, source: str = source) -> list[str]:
                return [pid for pid, _ in kb.nearest(q.tolist(), K, source)]

            got_w, ms_w = timed(where_filter, queries)
            row(ours_name, f"where source={source} (ef {HNSW_EF_SEARCH})", got_w, ms_w, in_source)
            got_p, ms_p = timed(nearest, queries)
            row(ours_name, f"nearest(source={source})", got_p, ms_p, in_source)

        if not args.skip_defaults:
            client = chromadb.PersistentClient(
                path=str(Path(tmp) / "defaults"), settings=Settings(anonymized_telemetry=False)
            )
            defaults = client.create_collection("defaults", configuration={"hnsw": {"space": "cosine"}})
            build_default = load(defaults, vectors, sources)

            def chroma_defaults(q: np.ndarray) -> list[str]:
                return defaults.query(query_embeddings=[q], n_results=K, include=[])["ids"][0]

            got, ms = timed(chroma_defaults, queries)
            row("Chroma defaults (M 16, ef_c 100)", "ef_search 100", got, ms)
            print(f"build: Chroma defaults {build_default:.0f} s", flush=True)
    print(f"build: MedBridge {build_ours:.0f} s; ratio: latency against the exact scan, measured in this run")
    print(f"wall: {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
