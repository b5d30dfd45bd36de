"""FHIR validation beside the request thread: worker processes that validate part of a transaction
Bundle's resources while the thread handling the request validates the rest.

Why processes: fhir.resources validation is Python (pydantic's core calls back into fhir_core's
validators for every element), so threads share one core under the GIL, and validation is most of
a Bundle's cost (~350 us of the ~800 us per resource over HTTP). A worker gives the request a second
core for it.

Why not ``concurrent.futures.ProcessPoolExecutor``: its feeder and result threads need the GIL that
the validating request thread holds, which the interpreter hands over only every 5 ms
(``sys.getswitchinterval``); a submitted share started late and came back late, and a Bundle took
longer than validating it alone (measured). Here the request thread itself writes the share to a
worker's stdin and reads the outcomes from its stdout: length-prefixed orjson frames, no other thread.

A worker is a ``python -m integration.fhir.validation`` subprocess running the same
``validate_resource``; its outcomes are the ones the request thread would have found. Anything that
goes wrong with a worker (it died, it is still starting, the share cannot be written as JSON) leaves
the share to the request thread: a worker only ever makes validation faster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from integration.errors import InvalidResourceError
from integration.fhir.resources import validate_resource

log = logging.getLogger(__name__)

# Bundles with fewer resources are validated by the request thread alone: a worker's round trip
# (~0.3 ms) is about one resource's validation
MIN_SHARED = 8
# The request thread's part of a shared Bundle, to start with. It adapts (see Share.outcomes): a worker
# may be slower than the request thread, e.g. where two cores are SMT siblings of one (as on the 2-core
# machines here: a worker validated ~40% slower than the request thread beside it) or busy elsewhere.
LOCAL_SHARE = 0.5
_SHARE_STEP, _SHARE_MIN, _SHARE_MAX = 0.02, 0.2, 0.8
_PROMPT_S = 0.0003  # an answer read within this was ready (or nearly) when the request thread got to it
# A worker that has not answered by then is killed and its share validated by the request thread
ANSWER_TIMEOUT_S = 60.0
START_TIMEOUT_S = 120.0  # to import fhir.resources and say ready (~2 s here)
_HEADER = struct.Struct("!I")
_READY = b"ready"

Outcome = tuple[int, list[tuple[str, str]]] | None  # None: valid; else (HTTP status, issues)


def _write_frame(out: IO[bytes], payload: bytes) -> None:
    out.write(_HEADER.pack(len(payload)) + payload)
    out.flush()


def _read_exactly(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError("the validation worker did not answer in time")
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("the validation worker exited")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None = None) -> bytes:
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size, deadline))
    return _read_exactly(fd, size, deadline)


def outcome_of(resource: Any) -> Outcome:
    """What ``validate_resource`` says about ``resource``: the same on either side of the pipe."""
    try:
        validate_resource(resource)
    except InvalidResourceError as exc:
        return exc.status_code, exc.issues
    return None


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The worker: a frame of resources (a JSON array) in, a frame of their outcomes out, until EOF."""
    _write_frame(answers, _READY)
    fd = requests.fileno()
    while True:
        try:
            request = _read_frame(fd)
        except EOFError:
            return
        _write_frame(answers, orjson.dumps([outcome_of(r) for r in orjson.loads(request)]))


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]

    def ask(self, payload: bytes) -> None:
        assert self.process.stdin is not None
        _write_frame(self.process.stdin, payload)

    def answer(self) -> bytes:
        assert self.process.stdout is not None
        return _read_frame(self.process.stdout.fileno(), time.monotonic() + ANSWER_TIMEOUT_S)

    def stop(self, *, kill: bool = False) -> None:
        if kill:  # it failed: whatever it is doing (or hanging in) is of no more use
            self.process.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                # stdin's EOF ends the worker's loop; closing flushes, which a dead worker's pipe refuses
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Share:
    """Resources ``start:`` of a Bundle, sent to a worker; ``outcomes`` waits for its verdicts
    (None where the worker failed: the caller validates those itself)."""

    workers: ValidationWorkers
    worker: _Worker
    start: int
    count: int
    _outcomes: list[Outcome] | None = field(default=None, init=False)
    _done: bool = field(default=False, init=False)

    def outcomes(self) -> list[Outcome] | None:
        if not self._done:
            self._done = True
            try:
                waited = time.perf_counter()
                frame = self.worker.answer()
                self.workers._adapt(time.perf_counter() - waited)
                answer = orjson.loads(frame)
                if not isinstance(answer, list) or len(answer) != self.count:
                    raise ValueError("the validation worker answered for a different number of resources")
                self._outcomes = [None if o is None else (o[0], [tuple(i) for i in o[1]]) for o in answer]
                self.workers.answered += 1
                self.workers._give_back(self.worker)
            except (OSError, EOFError, TimeoutError, ValueError, TypeError, IndexError) as exc:  # any bad answer
                log.warning("validation worker %d failed (%s); its share is validated in the request",
                            self.worker.process.pid, type(exc).__name__)
                self.workers._replace(self.worker)
        return self._outcomes


class ValidationWorkers:
    """``count`` validation worker processes, started on the first Bundle large enough to share
    (and in the background: until one is ready, requests validate alone). Each shared Bundle holds
    one worker from ``share`` until its outcomes are read."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self.local_share = LOCAL_SHARE
        self.answered = 0  # shares a worker validated

    def share(self, resources: list[Any]) -> Share | None:
        """Send the tail of ``resources`` to an idle worker; None (validate them all yourself) for a
        small Bundle, when no worker is ready, or when the tail cannot be written as JSON."""
        if self.count < 1 or len(resources) < MIN_SHARED or self._stopped:
            return None
        if not self._started:
            self._start()
        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            return None
        start = max(1, round(len(resources) * self.local_share))
        try:
            payload = orjson.dumps(resources[start:])
        except TypeError:  # an integer beyond 64 bits, a lone surrogate: orjson writes neither
            self._give_back(worker)
            return None
        try:
            worker.ask(payload)
        except (OSError, ValueError):  # the worker died (a broken pipe), or was stopped meanwhile
            self._replace(worker)
            return None
        return Share(self, worker, start, len(resources) - start)

    def _start(self) -> None:
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
            for _ in range(self.count):
                self._spawn()

    def _spawn(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # where `integration` is, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        process = subprocess.Popen([sys.executable, "-m", "integration.fhir.validation"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        worker = _Worker(process)
        self._all.append(worker)
        threading.Thread(target=self._await_ready, args=(worker,), name="fhir-validation-start",
                         daemon=True).start()

    def _await_ready(self, worker: _Worker) -> None:
        try:
            ready = _read_frame(worker.process.stdout.fileno(), time.monotonic() + START_TIMEOUT_S)  # type: ignore[union-attr]
        except (OSError, EOFError, TimeoutError):
            ready = b""
        if ready == _READY and not self._stopped:
            self._idle.put(worker)
        else:
            log.warning("validation worker %d did not start; requests validate alone", worker.process.pid)
            worker.stop()
            with self._lock:
                self._forget(worker)

    def _adapt(self, waited: float) -> None:
        """After a share's answer: the request thread takes more of the next Bundle when it had to wait
        for the worker, less when the worker was done first, so that both finish together."""
        step = _SHARE_STEP if waited > _PROMPT_S else -_SHARE_STEP
        self.local_share = min(_SHARE_MAX, max(_SHARE_MIN, self.local_share + step))

    def _give_back(self, worker: _Worker) -> None:
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.stop(kill=True)
        with self._lock:
            self._forget(worker)
            if not self._stopped:
                self._spawn()

    def _forget(self, worker: _Worker) -> None:  # with the lock held
        if worker in self._all:
            self._all.remove(worker)

    def ready(self) -> int:
        """Workers idle now."""
        return self._idle.qsize()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._all]

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.stop()


if __name__ == "__main__":
    # the protocol owns stdout: anything a library prints goes to stderr instead
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        serve(sys.stdin.buffer, answers)
    except BrokenPipeError:  # the parent went away (or gave up on this worker): nothing left to answer
        pass
