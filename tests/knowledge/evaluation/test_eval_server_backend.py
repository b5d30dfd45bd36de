"""``medbridge eval``'s server backend: drafts through an OpenAI-compatible server, several at once, scored in
the fixed subset's order.

The server here is a small stdlib ``http.server`` on a real socket that speaks llama.cpp's ``/tokenize`` and
OpenAI's ``/v1/chat/completions``: it answers each prompt with that report's own impression, after a delay that
makes later requests finish first. A perfect ROUGE-L therefore proves the drafts are matched back to their
reports whatever order they finish in, which llama.cpp's deterministic but unknowable drafts could not (the real
server's contract is tested in tests/knowledge/generation; the eval through it is the full run in BENCHMARKS.md).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from integration.app.cli import main
from knowledge.evaluation.openi import load_reports
from tests.knowledge.generation.misbehaving_server import serve_api

LIMIT = 4


class _Served:
    """What the server knows (each subset report's impression by its findings) and what it saw."""

    def __init__(self, impressions: dict[str, str]) -> None:
        self.impressions = impressions
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.temperatures: list[float] = []


def _answer(served: _Served, messages: list[dict[str, str]]) -> str:
    findings = re.search(r"\n\nFindings: (.*)\n\nImpression:$", messages[-1]["content"], re.S)
    return served.impressions.get(findings.group(1) if findings else "", "Unknown report.")


@contextmanager
def impression_server(served: _Served) -> Iterator[str]:
    """Serve on a free port; yields the API base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/tokenize":  # llama.cpp's dialect: one token per word is enough to budget
                body: dict[str, object] = {"tokens": list(range(len(request["content"].split())))}
            else:
                with served.lock:
                    served.in_flight += 1
                    served.max_in_flight = max(served.max_in_flight, served.in_flight)
                    served.temperatures.append(request.get("temperature"))
                    # the first requests wait longest, so they finish after the ones sent later
                    delay = 0.05 * max(LIMIT - len(served.temperatures), 0)
                time.sleep(delay)
                with served.lock:
                    served.in_flight -= 1
                message = {"role": "assistant", "content": _answer(served, request["messages"])}
                body = {"id": "c", "object": "chat.completion", "created": 0, "model": request["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with serve_api(Handler) as base_url:
        yield base_url


def test_eval_drafts_through_the_server_concurrently_in_subset_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from knowledge.evaluation.drafting import split_subset

    subset, _ = split_subset(load_reports(keep="findings and impression"), LIMIT)
    served = _Served({r.findings: r.impression for r in subset})
    with impression_server(served) as url:
        port = url.split(":")[2].split("/")[0]
        assert main(["eval", "--backend", "server", "--base-url", url, "--model", "stub", "--retrieval-queries", "0",
                     "--limit", str(LIMIT), "--kb-limit", "20", "--max-new-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith(f"| stub through 127.0.0.1:{port} (server)"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == str(LIMIT) and cells[2] == "1.000"  # every draft scored against its own report
    assert not any(line.startswith("| SmolLM2") for line in printed.splitlines())  # --backend server alone
    assert served.max_in_flight > 1  # several drafts in flight (MEDBRIDGE_LLM_CONCURRENCY, default 4)
    assert served.temperatures == [0.0] * LIMIT  # greedy: the figures depend only on the model
    assert f"--backend server --base-url {url} --model stub" in printed


def test_eval_refuses_the_server_backend_without_a_server() -> None:
    with pytest.raises(SystemExit, match="needs a server: set MEDBRIDGE_LLM_BASE_URL"):
        main(["eval", "--backend", "server", "--retrieval-queries", "0", "--limit", "1"])
