"""Ranking pieces of the knowledge base: the BM25 index and reciprocal rank fusion."""
