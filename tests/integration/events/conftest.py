"""Fixtures of the event tests: a SQLite store of their own (the broker is tests/conftest.py's ``kafka``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.db.store import Store


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    s.start()
    yield s
    s.stop()
