from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from integration.app import create_app
from integration.services import Services
from integration.store import Store
from tests.conftest import free_port, stack_settings


@pytest.fixture
def fhir_client(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    """The HTTP app served by a real uvicorn on a free port, and a client for it."""
    settings = stack_settings(tmp_path, max_request_bytes=200_000)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Services(settings, store)), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                      headers={"Content-Type": "application/fhir+json"}) as client:
        yield client
    server.should_exit = True
    thread.join(10)
