"""A real upstream EHR for the writeback tests (Medplum's FHIR router in Node, in memory) and a
fault-injecting TCP proxy in front of it that the tests switch between pass, refuse, 503, 4xx and hang.

The Node server keeps running through every outage (its in-memory data must survive); only the
proxy misbehaves.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, free_port

SERVER_DIR = REPO / "tests" / "upstream_fhir"


@dataclass
class UpstreamFhir:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth/token"

    def search(self, query: str, token: str | None = None) -> list[dict[str, Any]]:
        """Search the upstream directly (not through the proxy)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = httpx.get(f"{self.base}/{query}", headers=headers, timeout=10)
        resp.raise_for_status()
        return [e["resource"] for e in resp.json().get("entry") or []]

    def stats(self) -> dict[str, int]:
        return httpx.get(f"http://127.0.0.1:{self.port}/_admin/stats", timeout=10).json()

    def revoke_tokens(self) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/_admin/revoke-tokens", timeout=10).raise_for_status()


@pytest.fixture
def upstream_fhir() -> Iterator[Callable[..., UpstreamFhir]]:
    """Starts `node server.mjs <port>` with the given environment (auth settings) and waits for it."""
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        subprocess.run(["bash", str(REPO / "scripts" / "test-services.sh")], check=True)
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> UpstreamFhir:
        port = free_port()
        proc = subprocess.Popen(
            ["node", "server.mjs", str(port)], cwd=SERVER_DIR, env={**os.environ, **env},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        started.append(proc)
        deadline = time.monotonic() + 90  # loading the FHIR definitions takes seconds on a busy machine
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"upstream FHIR server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/_admin/stats", timeout=2)
                return UpstreamFhir(port, proc)
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("upstream FHIR server did not start within 90 s")

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _read_request(conn: socket.socket) -> bytes:
    """One HTTP/1.1 request (headers and Content-Length body), or b'' if the client went away."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        body += chunk
    return head + b"\r\n\r\n" + body


def _read_response(conn: socket.socket) -> None:
    """Reads (and drops) one HTTP response from the upstream."""
    _read_request(conn)  # same framing: headers, then Content-Length bytes


class FaultProxy:
    """A TCP proxy in front of the upstream with a switchable mode:

    - ``pass``: forwards both ways;
    - ``refuse``: nothing listens on the port (connection refused);
    - ``503`` / ``422``: answers every request with that status and an OperationOutcome;
    - ``hang``: forwards the request (the upstream processes it) but never answers the client, so
      the client times out without knowing whether its write happened.

    Switching mode closes every open connection, so kept-alive connections see the change at once.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = "pass"
        self.requests_by_mode: dict[str, int] = {}
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._listen()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _unlisten(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    def set_mode(self, mode: str) -> None:
        with self._lock:
            old, self.mode = self.mode, mode
            conns, self._conns = self._conns, set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        if mode == "refuse" and old != "refuse":
            self._unlisten()
        elif old == "refuse" and mode != "refuse":
            self._listen()

    def close(self) -> None:
        self.set_mode("refuse")

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._conns.update(socks)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self._track(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                mode = self.mode
                if mode == "pass":
                    return self._pipe(conn)
                request = _read_request(conn)
                if not request:
                    return
                with self._lock:
                    self.requests_by_mode[mode] = self.requests_by_mode.get(mode, 0) + 1
                if mode in ("503", "422"):
                    body = (b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"'
                            + (b"transient" if mode == "503" else b"business-rule")
                            + b'","details":{"text":"injected by the test proxy"}}]}')
                    reason = b"Service Unavailable" if mode == "503" else b"Unprocessable Entity"
                    conn.sendall(b"HTTP/1.1 " + mode.encode() + b" " + reason + b"\r\n"
                                 b"Content-Type: application/fhir+json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                    continue
                if mode == "hang":
                    with socket.create_connection(("127.0.0.1", self.target_port)) as up:
                        up.sendall(request)
                        _read_response(up)  # the upstream did the work; the client never hears of it
                    while conn.recv(65536):  # hold the client until it gives up or the mode changes
                        pass
                    return
        except OSError:
            return
        finally:
            conn.close()

    def _pipe(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            return
        self._track(up)

        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        t = threading.Thread(target=copy, args=(up, conn), daemon=True)
        t.start()
        copy(conn, up)
        t.join()
        up.close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[int], FaultProxy]]:
    proxies: list[FaultProxy] = []

    def start(target_port: int) -> FaultProxy:
        proxy = FaultProxy(target_port)
        proxies.append(proxy)
        return proxy

    yield start
    for p in proxies:
        p.close()


async def eventually(check: Callable[[], Any], timeout: float = 90, what: str = "condition") -> Any:
    """Polls ``check`` (sync, run in a thread) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} not reached after {timeout}s (last: {last!r})")


def key_pair(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A fresh private key (PEM) for the client and its public key (PEM) for the authorization server."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP384R1())
    private = tmp_path / f"{kind}-private.pem"
    public = tmp_path / f"{kind}-public.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
