"""What a MedBridge under fault talks to, each as a real process the suite can stop and start: a
private PostgreSQL cluster (so stopping it never touches the shared one other tests use), the
upstream EHR stand-in behind the refusing proxy, and Orthanc as the export PACS."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx

from tests.conftest import REPO, free_port
from tests.integration.conftest import Orthanc
from tests.integration.delivery.ehr.conftest import SERVER_DIR, FaultProxy, UpstreamFhir

__all__ = ["FaultProxy", "Orthanc", "PrivatePostgres", "UpstreamFhir", "start_upstream"]


def _postgres_bin() -> Path:
    """The newest Debian PostgreSQL server binaries (initdb, pg_ctl)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: "
                           "run scripts/test-services.sh (it installs postgresql)")
    return Path(found[-1]).parent


class PrivatePostgres:
    """A PostgreSQL cluster of the suite's own in ``folder`` on a free port, run as the ``postgres``
    user when the suite runs as root (initdb refuses root). ``stop()`` / ``start()`` make an outage."""

    def __init__(self, folder: Path) -> None:
        self.bin = _postgres_bin()
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.log = folder / "postgres.log"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            # a test cluster: nothing here must survive a power cut, and it must not compete for the disk
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.folder}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        self.start()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as in a database failover."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh database; its SQLAlchemy URL."""
        import psycopg

        name = f"faults_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop()
            except RuntimeError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def start_upstream() -> UpstreamFhir:
    """The upstream EHR stand-in (Medplum's router, in memory), no authentication."""
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        subprocess.run(["bash", str(REPO / "scripts" / "test-services.sh")], check=True)
    port = free_port()
    proc = subprocess.Popen(["node", "server.mjs", str(port)], cwd=SERVER_DIR, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90  # loading the FHIR definitions takes seconds on a busy machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the upstream FHIR stand-in exited with {proc.returncode}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/_admin/stats", timeout=2)
            return UpstreamFhir(port, proc)
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the upstream FHIR stand-in did not start within 90 s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
