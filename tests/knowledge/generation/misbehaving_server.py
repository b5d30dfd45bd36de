"""An OpenAI-compatible server on a real socket whose behaviour a test chooses: answer after a delay
(counting requests in flight, optionally holding them until several are), answer garbage, fail with a
status, or stop listening.

It speaks just enough of the API for the backend: ``POST /tokenize`` (llama.cpp's dialect, one token
per word) and ``POST /v1/chat/completions``. The real llama.cpp server is in ``conftest.llama_server``;
this one exists for the failures a healthy server never shows.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Mode = Literal["ok", "garbage-text", "garbage-json", "status"]


@dataclass
class Behaviour:
    mode: Mode = "ok"
    delay_seconds: float = 0.0
    status: int = 503
    answer: str = "Findings consistent with type 2 diabetes [1]."
    # Hold each request until this many have been in flight at once (or 10 s pass), so a test of
    # concurrency does not depend on how quickly a loaded machine schedules the client's threads.
    gather: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    completions: int = 0
    lock: threading.Condition = field(default_factory=threading.Condition)


def completion(text: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": "stub",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class _Handler(BaseHTTPRequestHandler):
    behaviour: Behaviour

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/tokenize":
            self._send(200, json.dumps({"tokens": list(range(len(request["content"].split())))}).encode())
            return
        b = self.behaviour
        with b.lock:
            b.in_flight += 1
            b.max_in_flight = max(b.max_in_flight, b.in_flight)
            b.lock.notify_all()
            b.lock.wait_for(lambda: b.max_in_flight >= b.gather, timeout=10)
        try:
            time.sleep(b.delay_seconds)
            if b.mode == "status":
                self._send(b.status, b'{"error": {"message": "overloaded"}}')
            elif b.mode == "garbage-text":
                self._send(200, b"<html>\x00\xff not a completion", "text/html")
            elif b.mode == "garbage-json":
                self._send(200, json.dumps({"result": "what choices?"}).encode())
            else:
                self._send(200, json.dumps(completion(b.answer)).encode())
                b.completions += 1
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to answer
        finally:
            with b.lock:
                b.in_flight -= 1


@contextmanager
def misbehaving_server(behaviour: Behaviour) -> Iterator[str]:
    """Serve ``behaviour`` on a free port; yields the API base URL (``http://127.0.0.1:N/v1``)."""
    with serve_api(type("Handler", (_Handler,), {"behaviour": behaviour})) as base_url:
        yield base_url


@contextmanager
def serve_api(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free port from a thread; yields the API base URL (``http://127.0.0.1:N/v1``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
