"""Shared fixtures: real components only (embedded Kafka broker, SQLite and PostgreSQL, uvicorn)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from integration.db.store import Store  # noqa: E402
from integration.dicom.network.listener import DicomListener  # noqa: E402
from integration.events.embedded import EmbeddedBroker  # noqa: E402
from integration.events.topics import ensure_topics  # noqa: E402

PG_ADMIN_URL = os.environ.get("MEDBRIDGE_TEST_PG_URL", "postgresql://medbridge:medbridge@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _pynetdicom_requests_wait_for_their_reactor() -> None:
    """The tests' own requestors (pynetdicom SCUs) get MedBridge's workaround for pynetdicom#875 too:
    MedBridge answers fast enough to expose it (see ``integration.dicom.network.requestor``)."""
    from integration.dicom.network.requestor import adapt_requests

    adapt_requests()


@pytest.fixture(autouse=True)
def _log_rate_limits_start_afresh() -> None:
    """A runtime started by an earlier test installs rate-limiting filters on loggers (process-wide): what
    they saw then must not hold back a line a later test waits for."""
    import logging

    from integration.events.supervision import RepeatedMessageFilter

    for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for flt in getattr(logger, "filters", ()):
            if isinstance(flt, RepeatedMessageFilter):
                flt.forget()


@pytest.fixture(autouse=True, scope="session")
def _test_issuer_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded-issuer signing key for every server of the session (``stack_settings`` points them
    at it), so ``tests.authorized`` holds one token that each of them accepts."""
    from tests import authorized

    path = tmp_path_factory.mktemp("auth") / "signing-key.pem"
    authorized.use_issuer_key(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """PostgreSQL is a real dependency of the store: start it (idempotently) rather than skip."""
    subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh")], check=True)
    return PG_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    import psycopg

    name = f"medbridge_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = postgres_admin_url.rsplit("/", 1)[0]
    yield f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        for attempt in range(20):
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except psycopg.errors.InsufficientPrivilege:
                # an autovacuum worker in the database (after the test's writes): a non-superuser's FORCE
                # may not end it; it finishes in moments (seen once in CI)
                if attempt == 19:
                    raise
                time.sleep(0.5)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The store on both engines it supports."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = Store(url)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[Store]:
    """The store on PostgreSQL alone: the engine that workers running side by side share in production."""
    s = Store(postgres_url)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def listener(store: Store, tmp_path: Path) -> Iterator[DicomListener]:
    """A bare DICOM listener on a free port over the test's store (any caller, 60 s quiet period)."""
    lst = DicomListener(store, tmp_path / "dicom", host="127.0.0.1", port=0, ae_title="MEDBRIDGE",
                        study_quiet_seconds=60)
    lst.start()
    yield lst
    lst.stop()


@pytest.fixture
async def kafka() -> AsyncIterator[str]:
    """A fresh embedded Kafka-protocol broker (tansu) with MedBridge's topics; its bootstrap address."""
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        await ensure_topics(broker.bootstrap_servers)
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def imaging_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo CNN's MONAI bundle folder from a quick run of the project's own training script."""
    from inference.imaging.train import train_demo_model

    path = tmp_path_factory.mktemp("models") / "demo-bundle"
    train_demo_model(path, quick=True, log=lambda _m: None)
    return path


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (real transformers generation path; its words are random)."""
    from knowledge.testing import build_tiny_random_llama

    return build_tiny_random_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def seeded_chroma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ChromaDB folder holding the full shipped corpus, ingested once per session; runtimes copy it."""
    from knowledge.ingest import ingest_default_corpus
    from knowledge.store import KnowledgeBase

    path = tmp_path_factory.mktemp("chroma-seed")
    kb = KnowledgeBase(path)
    written = ingest_default_corpus(kb)
    assert written == kb.count() > 0
    return path


@contextmanager
def serve_app(settings, store: Store, fhir_validation=None, configure=None) -> Iterator[int]:  # noqa: ANN001 - Settings, ValidationWorkers, Callable[[FastAPI], None]
    """The HTTP app (FHIR, DICOMweb, API) on a real uvicorn in a thread, on a free port; yields the port.
    Without ``fhir_validation`` (ValidationWorkers) the request threads validate alone. ``configure(app)``
    runs before it serves (to add what a deployment adds in front, such as the authentication layer)."""
    import threading
    import time

    import uvicorn

    from integration.app.http import create_app
    from integration.app.services import Services

    port = free_port()
    app = create_app(Services(settings, store, fhir_validation=fhir_validation))
    if configure is not None:
        configure(app)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until_answers(process: subprocess.Popen[bytes], url: str, log: Path, what: str, within: float) -> None:
    """Poll ``url`` until it answers 200; AssertionError, with the end of ``log``, if ``process`` exits first or
    ``within`` seconds pass."""
    import httpx

    deadline = time.monotonic() + within
    while True:
        assert process.poll() is None, f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} not up in {within:.0f} s:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def stack_settings(tmp_path: Path, **overrides: object):  # noqa: ANN201 - returns Settings
    from integration.app.settings import Settings
    from tests import authorized

    values: dict[str, object] = {
        "data_dir": tmp_path / "var",
        "dicom_host": "127.0.0.1",
        "dicom_port": free_port(),
        "http_port": free_port(),
        "embedded_kafka_port": free_port(),
        "kafka_bootstrap_servers": "",
        "study_quiet_seconds": 1.0,
        "record_quiet_seconds": 1.0,
        "viewer_enabled": False,
        "database_url": "",
        "auth_signing_key": authorized.issuer_key(),  # the session's test issuer (tests.authorized)
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def demo_clinical_report(settings, within: float, poll: float = 0.5):  # noqa: ANN001, ANN201
    """Start the stack ``settings`` describe, post the demo patient's Bundle and wait up to ``within`` seconds for
    its clinical report; (the stopped runtime, the DiagnosticReport, its ``/api/reports`` detail)."""
    import asyncio

    from integration.app.demo import demo_bundle
    from integration.app.runtime import Runtime
    from tests import authorized

    runtime = Runtime(settings)
    await runtime.start()
    try:
        async with authorized.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as client:
            r = await client.post("/fhir", json=demo_bundle())
            assert r.status_code == 200, r.text
            patient = r.json()["entry"][0]["response"]["location"].split("/_history")[0]
            deadline = time.monotonic() + within
            while not (bundle := (await client.get("/fhir/DiagnosticReport", params={"subject": patient})).json()).get(
                "entry"
            ):
                assert time.monotonic() < deadline, f"no clinical report within {within:.0f} s"
                await asyncio.sleep(poll)
            report = bundle["entry"][0]["resource"]
            detail = (await client.get(f"/api/reports/{report['id']}")).json()
    finally:
        await runtime.stop()
    return runtime, report, detail


@pytest.fixture
async def stack(tmp_path: Path, imaging_weights: Path, tiny_llm: Path, seeded_chroma: Path):  # noqa: ANN201
    """The whole MedBridge stack, as `medbridge run` starts it, on free ports in a temp folder."""
    import shutil

    from integration.app.runtime import Runtime

    shutil.copytree(seeded_chroma, tmp_path / "var" / "chroma")
    settings = stack_settings(tmp_path, imaging_model=imaging_weights, llm_model=tiny_llm)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()
