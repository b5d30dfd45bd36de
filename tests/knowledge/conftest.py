"""Fixtures for knowledge tests: a real ChromaDB in a temporary folder with the real MiniLM model."""

from __future__ import annotations

import os

# Before anything imports transformers / sentence-transformers: no model hub here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from knowledge.store import KnowledgeBase  # noqa: E402


@pytest.fixture(scope="session")
def ingested_kb_path(seeded_chroma: Path) -> Path:
    """A knowledge base folder holding the full default corpus, ingested once per session (root conftest)."""
    return seeded_chroma


@pytest.fixture(scope="session")
def ingested_kb(ingested_kb_path: Path) -> KnowledgeBase:
    return KnowledgeBase(ingested_kb_path)


@pytest.fixture(scope="session")
def llm_cache_dir() -> Path:
    """Where the SmolLM2 demo model is converted; shared across runs so it is converted once."""
    path = Path(os.environ.get("MEDBRIDGE_TEST_CACHE", "/tmp/medbridge-test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path
