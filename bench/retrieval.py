"""Dense retrieval: HNSW recall against exact search, and query latency, at 100,000 passages.

    PYTHONPATH=$PWD .venv/bin/python bench/retrieval.py            # 100,000 passages, 200 queries
    PYTHONPATH=$PWD .venv/bin/python bench/retrieval.py --n 20000  # quicker

The vectors are synthetic, not MiniLM embeddings of real passages (embedding 100,000 passages takes
well over ten minutes on two CPU cores): 384-dimensional unit vectors drawn around n/50 random
topic centres (a Gaussian mixture, cosine to the own centre about 0.78, to another topic's
passages about 0), which gives the clustered shape of sentence embeddings; queries come from the
same mixture and are not in the index. Exact
search is a numpy scan of the same vectors. Both collections are real persistent Chroma
collections in a temporary folder: one with Chroma's defaults (M 16, ef_construction 100,
ef_search 100), one as MedBridge creates them (knowledge.store.HNSW_*), whose ef_search is then
changed on the open collection (KnowledgeBase.set_search_ef, no restart) to sweep it.

The `source` filter: 4% of the passages carry source "notes" and the rest "icd" (the shipped
corpus' proportions). Chroma's `where` filter is timed against KnowledgeBase.nearest, which
searches unfiltered for 4k and keeps the source's hits, falling back to the filter when too few.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
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


def mixture(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    x = centres[picks] + rng.normal(0.0, spread / np.sqrt(DIM), (n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


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


def recall(got: list[list[str]], truth: np.ndarray) -> tuple[float, float]:
    r = [len(set(g[:K]) & {str(t) for t in row}) / K for g, row in zip(got, truth, strict=True)]
    top1 = [bool(g) and g[0] == str(row[0]) for g, row in zip(got, truth, strict=True)]
    return float(np.mean(r)), float(np.mean(top1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--skip-defaults", action="store_true", help="no collection with Chroma's defaults")
    args = parser.parse_args()

    import chromadb
    from chromadb.config import Settings

    from knowledge.store import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, KnowledgeBase

    rng = np.random.default_rng(18)
    centres = rng.normal(size=(max(1, args.n // 50), DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = mixture(rng, args.n, centres, SPREAD)
    queries = mixture(rng, args.queries, centres, SPREAD)
    sources = np.where(rng.random(args.n) < 0.04, "notes", "icd").tolist()
    truth = exact_top(vectors, queries, K)
    notes_idx = np.flatnonzero(np.asarray(sources) == "notes")
    truth_notes = notes_idx[exact_top(vectors[notes_idx], queries, K)]

    print(f"{args.n:,} synthetic 384-d passages, {args.queries} queries, k={K}", flush=True)
    print(f"| {'collection':<34} | {'search':<28} | recall@10 | top-1 same | ms/query (p50) |")
    print(f"|{'-' * 36}|{'-' * 30}|-----------|------------|----------------|", flush=True)
    _, exact_ms = timed(lambda q: [str(i) for i in exact_top(vectors, q[None, :], K)[0]], queries)

    def row(config: str, search: str, r: float, t1: float, ms: float) -> None:
        # Rows print as they are measured: a 100,000-passage build takes minutes on a busy machine.
        print(f"| {config:<34} | {search:<28} | {r:9.4f} | {t1:10.3f} | {ms:7.2f} ({ms / exact_ms:.2f}x) |", flush=True)

    row("numpy exact scan (baseline)", "-", 1.0, 1.0, exact_ms)
    with tempfile.TemporaryDirectory() as tmp:
        # MedBridge's collection: created by KnowledgeBase; the vectors go in directly (no text to embed).
        kb = KnowledgeBase(Path(tmp) / "medbridge", collection="bench")
        build_ours = load(kb._collection, vectors, sources)  # noqa: SLF001 - bulk vectors, bench only
        ours_name = f"MedBridge (M {HNSW_M}, ef_c {HNSW_EF_CONSTRUCTION})"
        for ef in (100, HNSW_EF_SEARCH, 400):
            kb.set_search_ef(ef)

            def ours(q: np.ndarray) -> list[str]:
                return [pid for pid, _ in kb.nearest(q.tolist(), K)]

            got, ms = timed(ours, queries)
            row(ours_name, f"ef_search {ef}", *recall(got, truth), ms)
        kb.set_search_ef(HNSW_EF_SEARCH)

        icd_idx = np.flatnonzero(np.asarray(sources) == "icd")
        truth_icd = icd_idx[exact_top(vectors[icd_idx], queries, K)]
        for source, source_truth in (("icd", truth_icd), ("notes", truth_notes)):

            def where_filter(q: np.ndarray, source: str = source) -> list[str]:
                res = kb._collection.query(  # noqa: SLF001 - the plain filter, as before
                    query_embeddings=[q], n_results=K, where={"source": source}, include=[]
                )
                return res["ids"][0]

            def nearest(q: np.ndarray, source: str = source) -> list[str]:
                return [pid for pid, _ in kb.nearest(q.tolist(), K, source)]

            got_w, ms_w = timed(where_filter, queries)
            row(ours_name, f"where source={source}", *recall(got_w, source_truth), ms_w)
            got_p, ms_p = timed(nearest, queries)
            row(ours_name, f"nearest(source={source})", *recall(got_p, source_truth), ms_p)

        if not args.skip_defaults:
            client = chromadb.PersistentClient(
                path=str(Path(tmp) / "defaults"), settings=Settings(anonymized_telemetry=False)
            )
            defaults = client.create_collection("defaults", configuration={"hnsw": {"space": "cosine"}})
            build_default = load(defaults, vectors, sources)

            def chroma_defaults(q: np.ndarray) -> list[str]:
                return defaults.query(query_embeddings=[q], n_results=K, include=[])["ids"][0]

            got, ms = timed(chroma_defaults, queries)
            row("Chroma defaults (M 16, ef_c 100)", "ef_search 100", *recall(got, truth), ms)
            print(f"build: Chroma defaults {build_default:.0f} s", flush=True)
    print(f"build: MedBridge {build_ours:.0f} s; ratio: latency against the exact scan, measured in this run")


if __name__ == "__main__":
    main()
