"""`medbridge run` as a real child process: configured by environment as an operator would, its
stdout and stderr in a log file, its own process tree found through /proc (the embedded broker, the
listener processes), and its peak memory (VmHWM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/*/stat's ppid field)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of ``pid`` (the peak resident set), 0 once it is gone."""
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MedbridgeProcess:
    """One `medbridge run` with ``env`` over the current environment; ``start()`` may be called again
    after a kill (same data dir, same database, same ports: nothing cleaned up by hand)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, str] = {}  # every process of its tree ever seen (pid -> command line), to end orphans
        self.peak_rss = 0  # the highest VmHWM of any run
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.env['MEDBRIDGE_HTTP_PORT']}"

    @property
    def dicom_port(self) -> int:
        return int(self.env["MEDBRIDGE_DICOM_PORT"])

    def start(self, timeout: float = 240) -> None:
        """Starts it and waits for its "MedBridge is up" line; raises with the log's tail if it exits."""
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "integration.app.cli", "run"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **self.env},
            )
        mark = f"===== start {self.starts} "
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.track_tree()
            if self.proc.poll() is not None:
                raise RuntimeError(f"medbridge run exited with {self.proc.returncode} during start-up:\n{self.tail()}")
            text = self.log_path.read_text(errors="replace")
            if "MedBridge is up" in text[text.rfind(mark):]:
                self.track_tree()
                return
            time.sleep(0.25)
        raise RuntimeError(f"medbridge run did not come up within {timeout}s:\n{self.tail()}")

    def track_tree(self) -> list[int]:
        """The runtime's descendants now (and remembers them)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        self.peak_rss = max(self.peak_rss, peak_rss_bytes(self.proc.pid))
        found, todo = [], [self.proc.pid]
        while todo:
            for child in children_of(todo.pop()):
                found.append(child)
                todo.append(child)
        # refreshed while they are its descendants: one seen between fork and exec showed its parent's command line
        self.seen.update({pid: command_line(pid) for pid in found})
        return found

    def broker_pid(self) -> int:
        """The embedded broker (tansu) among the runtime's children."""
        for pid in self.track_tree():
            if "tansu" in command_line(pid) or " broker --listener-url" in command_line(pid):
                return pid
        raise AssertionError("no embedded broker among the runtime's children (is KAFKA_BOOTSTRAP_SERVERS set?)")

    def kill(self) -> None:
        """SIGKILL of the runtime process alone, as the OOM killer or a node failure does it."""
        self.track_tree()
        self.peak_rss = max(self.peak_rss, peak_rss_bytes(self.pid))
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait (the orderly stop); then ends whatever of its tree is left, by pid."""
        if self.proc is not None and self.proc.poll() is None:
            self.track_tree()
            self.peak_rss = max(self.peak_rss, peak_rss_bytes(self.proc.pid))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.end_leftovers()
        return self.proc.returncode if self.proc else None

    def leftovers(self) -> list[int]:
        """Processes of its tree still alive although the runtime is not (orphans)."""
        # the command line must still match: a pid may have been reused since
        return sorted(pid for pid, cmd in self.seen.items() if alive(pid) and command_line(pid) == cmd)

    def end_leftovers(self) -> None:
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def health(self) -> tuple[int, dict[str, object]]:
        try:
            r = httpx.get(f"{self.http}/health", timeout=5)
            return r.status_code, r.json()
        except (httpx.HTTPError, ValueError):
            return 0, {}
