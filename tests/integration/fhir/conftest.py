from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from integration.store import Store
from tests.conftest import serve_app, stack_settings


@pytest.fixture
def fhir_client(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    """The HTTP app served by a real uvicorn on a free port, and a client for it."""
    with serve_app(stack_settings(tmp_path, max_request_bytes=200_000), store) as port, httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Content-Type": "application/fhir+json"}
    ) as client:
        yield client
