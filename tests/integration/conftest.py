"""Orthanc as a real third-party DICOM peer: a child process on free ports in a temp folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

ORTHANC_AE = "ORTHANC"


class Orthanc:
    """One Orthanc server: ``start()`` / ``stop()`` (it can be started late, to simulate an outage)."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, str, int]] | None = None) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "medbridge-test",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,  # tests talk to it on 127.0.0.1 only
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "TcpNoDelay": True,
            "Plugins": [],
            "DicomModalities": {name: list(m) for name, m in self.modalities.items()},
            "DicomScuTimeout": 30,
        }

    def start(self, timeout: float = 60) -> None:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config()))
        env = {**os.environ, "TCP_NODELAY": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([binary, str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # REST helpers ------------------------------------------------------------------------------
    def rest(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series Orthanc holds in the study, expanded (MainDicomTags, Instances)."""
        with self.rest() as c:
            r = c.post("/tools/find", json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid},
                                            "Expand": True})
            r.raise_for_status()
            return r.json()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Any]:
    """Builds (unstarted) Orthanc servers; stops every one at teardown."""
    servers: list[Orthanc] = []

    def make(modalities: dict[str, tuple[str, str, int]] | None = None) -> Orthanc:
        folder = tmp_path / f"orthanc{len(servers)}"
        folder.mkdir()
        server = Orthanc(folder, modalities)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def orthanc(orthanc_factory: Any) -> Orthanc:
    """A started Orthanc with no modalities configured."""
    server = orthanc_factory()
    server.start()
    return server


@pytest.fixture
async def export_stack(tmp_path: Path, imaging_weights: Path) -> AsyncIterator[Any]:
    """Starts the MedBridge runtime (imaging, reports and dicom-export workers, no LLM) with the
    given DICOM peers and settings overrides; stops it at teardown. Usage: ``await export_stack(peers)``."""
    from integration.app.runtime import Runtime
    from integration.app.settings import DicomPeer
    from tests.conftest import stack_settings

    runtimes: list[Runtime] = []

    async def start(peers: list[DicomPeer], **overrides: object) -> Runtime:
        values: dict[str, object] = {
            "imaging_model": imaging_weights,
            "workers": "imaging,reports,dicom-export",
            "dicom_peers": peers,
            "dicom_allow_any_caller": True,  # the tests' modalities (storescu, pynetdicom) are not peers
            "dicom_export_backoff_seconds": 0.3,
            "dicom_export_max_backoff_seconds": 2.0,
            "dicom_export_timeout_seconds": 10.0,
        }
        values.update(overrides)
        runtime = Runtime(stack_settings(tmp_path, **values))
        runtimes.append(runtime)
        await runtime.start()
        return runtime

    yield start
    for runtime in reversed(runtimes):
        await runtime.stop()
