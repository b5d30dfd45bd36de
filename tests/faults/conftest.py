"""Fixtures of the fault suite: a private PostgreSQL cluster and the upstream EHR stand-in for the
session, and MedBridge stacks (`medbridge run` as a child process with Orthanc and the refusing proxy)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.peers import FaultProxy, Orthanc, PrivatePostgres, UpstreamFhir, start_upstream, stop_process
from tests.faults.process import MedbridgeProcess
from tests.faults.stack import Durations, FaultStack, copy_chroma, quick_environment


@pytest.fixture(scope="session")
def durations() -> Durations:
    return Durations.from_environment()


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """The suite's own PostgreSQL cluster: the database-outage fault stops it, never the shared one.
    Its folder is under /tmp itself (pytest's temp folders are private to root; the server runs as postgres)."""
    pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="medbridge-faults-pg-")))
    pg.init()
    yield pg
    pg.destroy()


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamFhir]:
    """The upstream EHR stand-in, shared: every check asks it about one report id, unique per run."""
    up = start_upstream()
    yield up
    stop_process(up.proc)


StackFactory = Callable[..., FaultStack]


class Stacks:
    """Builds stacks in ``folder``; ``close()`` stops every MedBridge, Orthanc and proxy it made."""

    def __init__(self, folder: Path, upstream: UpstreamFhir, postgres: PrivatePostgres,
                 models: dict[str, Path]) -> None:
        self.folder = folder
        self.upstream = upstream
        self.postgres = postgres
        self.models = models
        self.made: list[FaultStack] = []

    def make(self, name: str, *, engine: str = "postgresql", data_dir: Path | None = None,
             env: dict[str, str] | None = None, start: bool = True) -> FaultStack:
        """A stack on PostgreSQL (a fresh database on the private cluster) or SQLite (in the data dir);
        ``data_dir`` puts the data dir elsewhere (a small tmpfs)."""
        folder = self.folder / name
        (folder / "orthanc").mkdir(parents=True)
        orthanc = Orthanc(folder / "orthanc")
        orthanc.start()
        proxy = FaultProxy(self.upstream.port)
        url = self.postgres.new_database() if engine == "postgresql" else ""
        environment = quick_environment(folder, imaging_model=self.models["imaging"], llm_model=self.models["llm"],
                                        database_url=url, upstream_url=proxy.base, orthanc=orthanc)
        if data_dir is not None:
            environment["MEDBRIDGE_DATA_DIR"] = str(data_dir)
        environment.update(env or {})
        copy_chroma(self.models["chroma"], Path(environment["MEDBRIDGE_DATA_DIR"]))
        process = MedbridgeProcess(environment, folder / "medbridge.log")
        stack = FaultStack(process, self.upstream, proxy, orthanc, folder,
                           self.postgres if engine == "postgresql" else None)
        self.made.append(stack)
        if start:
            process.start()
        return stack

    def close(self) -> None:
        for stack in reversed(self.made):
            stack.process.stop()
            stack.orthanc.stop()
            stack.proxy.close()


def _models(request: pytest.FixtureRequest) -> dict[str, Path]:
    return {"imaging": request.getfixturevalue("imaging_weights"), "llm": request.getfixturevalue("tiny_llm"),
            "chroma": request.getfixturevalue("seeded_chroma")}


@pytest.fixture
def stacks(request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamFhir,
           private_postgres: PrivatePostgres) -> Iterator[Stacks]:
    """Stacks of one test; on failure the runtime's log is kept in the test's tmp dir."""
    made = Stacks(tmp_path, upstream, private_postgres, _models(request))
    yield made
    made.close()


@pytest.fixture(scope="module")
def shared_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamFhir,
                 private_postgres: PrivatePostgres) -> Iterator[FaultStack]:
    """One stack for the faults that leave MedBridge itself running (peers down, hostile input): each
    run counts only its own studies, patients and reports."""
    made = Stacks(tmp_path_factory.mktemp("shared-stack"), upstream, private_postgres, _models(request))
    yield made.make("shared")
    made.close()
