from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from integration.db.store import Store
from tests import authorized
from tests.conftest import serve_app, stack_settings


@pytest.fixture
def fhir_client(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    """The HTTP app served by a real uvicorn on a free port, and a client for it."""
    with serve_app(stack_settings(tmp_path, max_request_bytes=200_000), store) as port, authorized.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Content-Type": "application/fhir+json"}
    ) as client:
        yield client


@pytest.fixture
def shared_database_ports(store: Store, tmp_path: Path) -> Iterator[list[int]]:
    """Two apps, each with its own Store (connection pool) on the same database, as two MedBridge processes
    of a cluster run: their ports."""
    other = Store(str(store.engine.url.render_as_string(hide_password=False)))
    other.start()
    try:
        with ExitStack() as stack:
            yield [stack.enter_context(serve_app(stack_settings(tmp_path / f"app{i}"), s))
                   for i, s in enumerate((store, other))]
    finally:
        other.stop()


def clients_for(stack: ExitStack, ports: list[int], count: int) -> list[httpx.Client]:
    """``count`` HTTP clients (one per writer thread), spread over the apps on ``ports`` in turn."""
    return [stack.enter_context(authorized.Client(
        base_url=f"http://127.0.0.1:{ports[i % len(ports)]}", timeout=60,
        headers={"Content-Type": "application/fhir+json"})) for i in range(count)]


@pytest.fixture
def two_servers(shared_database_ports: list[int]) -> Iterator[list[httpx.Client]]:
    """A client for each of the two apps on one database."""
    with ExitStack() as stack:
        yield clients_for(stack, shared_database_ports, 2)


def at_once(clients: list[httpx.Client], send: Callable[[int, httpx.Client], httpx.Response]
            ) -> list[httpx.Response]:
    """``send(i, clients[i])`` on one thread per client, all released together by a barrier."""
    barrier = threading.Barrier(len(clients))
    out: list[httpx.Response | None] = [None] * len(clients)

    def run(i: int) -> None:
        barrier.wait()
        out[i] = send(i, clients[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in out), "a writer did not answer within 60 s"
    return [r for r in out if r is not None]
