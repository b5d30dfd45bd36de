"""Forward passes shared by the studies in flight: images of several studies go through a model's network together.

The imaging worker handles several StudyReceived events at once (``MEDBRIDGE_IMAGING_CONCURRENCY``). Each study
prepares its images' inputs and asks :meth:`SharedBatcher.classify` for their probabilities; the batcher queues
them per model and runs the model's forward on the queued images of every waiting study at once when:

* the model's batch is full (``batch_size`` images queued), or
* every study in flight (:meth:`SharedBatcher.study`) is waiting on the batcher: none can add more, or
* the oldest queued images have waited ``max_wait_seconds`` (a study still decoding or explaining is not waited for
  longer than that).

Contract:

* A study gets exactly what :meth:`~inference.imaging.operator.BundleOperator.classify_inputs` would give it alone,
  in the order of its inputs: a study's images may be split across forwards, and each forward's rows go back to
  the studies they came from.
* A forward that raises fails every study with images in it: each raises that exception (a copy of its own, so
  the threads' tracebacks do not mix), and the consumer's ack policy retries or dead-letters each event as it
  does for a study alone. Images of a failed study still queued are dropped.
* There is no thread of its own: the forward runs on the thread of a waiting study (the one that finds the batch
  due), so nothing needs stopping and nothing can be left waiting on a stopped thread. Every waiting study either
  has its images taken by a forward that is running (whose thread delivers the result or the error) or takes them
  itself once its wait is over.
* Thread-safe; a call outside :meth:`~SharedBatcher.study` counts as a study of its own that is waiting.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

__all__ = ["Classifier", "SharedBatcher"]

Probabilities = dict[str, float]


class Classifier(Protocol):
    """What the batcher needs of a model (:class:`~inference.imaging.operator.BundleOperator` is one)."""

    batch_size: int

    def classify_inputs(self, inputs: Sequence[torch.Tensor]) -> list[Probabilities]: ...


@dataclass(eq=False)
class _Request:
    """One study's images for one model, until each has its probabilities or the study its error."""

    inputs: Sequence[torch.Tensor]
    queued_at: float
    results: list[Probabilities | None] = field(default_factory=list)
    taken: int = 0  # inputs handed to a forward so far
    scored: int = 0
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.scored == len(self.inputs)


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int


def _own_copy(exc: BaseException) -> BaseException:
    """``exc`` for one more study's thread: the same type and message, caused by ``exc`` (whose traceback
    shows where the forward failed); ``exc`` itself when it cannot be copied."""
    try:
        twin = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception type that cannot be rebuilt from its args: share it
        return exc
    twin.__cause__, twin.__traceback__ = exc, None
    return twin


class SharedBatcher:
    """Batches the forwards of the studies in flight, per model; see the module docstring."""

    def __init__(self, max_wait_seconds: float = 0.005) -> None:
        if max_wait_seconds < 0:
            raise ValueError("max_wait_seconds must be >= 0")
        self.max_wait_seconds = max_wait_seconds
        self._cond = threading.Condition()
        self._queues: dict[Classifier, deque[_Request]] = {}
        self._in_flight = 0  # studies inside study()
        self._waiting = 0  # calls of classify() not returned yet
        self.forwards = 0  # forward batches run (each at most batch_size images): the bench and the tests read it

    @contextmanager
    def study(self) -> Iterator[None]:
        """Count a study in flight while the block runs: the batcher waits (up to ``max_wait_seconds``) for it
        to add its images before running a forward that is not full."""
        with self._cond:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()  # one fewer study to wait for: a partial batch may be due now

    def classify(self, model: Classifier, inputs: Sequence[torch.Tensor]) -> list[Probabilities]:
        """Probabilities for each input, in order, as ``model.classify_inputs(inputs)`` gives them; raises what
        the forward that held any of them raised."""
        if not inputs:
            return []
        request = _Request(inputs, time.monotonic(), [None] * len(inputs))
        with self._cond:
            self._queues.setdefault(model, deque()).append(request)
            self._waiting += 1
            try:
                self._serve_until_finished(request)
            finally:
                self._waiting -= 1
                self._cond.notify_all()  # the studies left may all be waiting now
        if request.error is not None:
            raise request.error
        return [r for r in request.results if r is not None]

    # -- under self._cond ---------------------------------------------------------------------------------------
    def _serve_until_finished(self, request: _Request) -> None:
        while not request.finished:
            due = self._due()
            if due is not None:
                self._run(*due)
                continue
            self._cond.wait(self._time_to_deadline())

    def _due(self) -> tuple[Classifier, list[_Slice]] | None:
        """The next batch to run, taken off its queue, or None while every queue should still wait."""
        now = time.monotonic()
        everyone_waits = self._waiting >= self._in_flight
        for model, queue in self._queues.items():
            if not queue:
                continue
            queued = sum(len(r.inputs) - r.taken for r in queue)
            if (queued >= model.batch_size or everyone_waits
                    or now - queue[0].queued_at >= self.max_wait_seconds):
                return model, self._take(queue, model.batch_size)
        return None

    @staticmethod
    def _take(queue: deque[_Request], size: int) -> list[_Slice]:
        batch: list[_Slice] = []
        while queue and size > 0:
            request = queue[0]
            count = min(size, len(request.inputs) - request.taken)
            batch.append(_Slice(request, request.taken, request.taken + count))
            request.taken += count
            size -= count
            if request.taken == len(request.inputs):
                queue.popleft()
        return batch

    def _time_to_deadline(self) -> float | None:
        oldest = [queue[0].queued_at for queue in self._queues.values() if queue]
        if not oldest:
            return None  # all our images are in a running forward: its thread notifies when done
        return max(0.0, min(oldest) + self.max_wait_seconds - time.monotonic())

    def _run(self, model: Classifier, batch: list[_Slice]) -> None:
        """The forward of ``batch`` on this thread, the lock released meanwhile; its rows (or its error) go to
        the requests they came from."""
        inputs = [s.request.inputs[i] for s in batch for i in range(s.start, s.stop)]
        self.forwards += 1
        self._cond.release()
        try:
            scored: list[Probabilities] | None = model.classify_inputs(inputs)
            failure: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - handed to every study of the batch below, then re-raised if fatal
            scored, failure = None, exc
        finally:
            self._cond.acquire()
        try:
            if scored is not None:
                self._deliver(batch, scored)
            else:
                assert failure is not None
                self._fail(batch, failure)
        finally:
            self._cond.notify_all()
        if failure is not None and not isinstance(failure, Exception):
            raise failure  # KeyboardInterrupt, SystemExit: this thread stops, the others got their error

    def _deliver(self, batch: list[_Slice], scored: list[Probabilities]) -> None:
        rows = iter(scored)
        for s in batch:
            for i in range(s.start, s.stop):
                s.request.results[i] = next(rows)
            s.request.scored += s.stop - s.start

    def _fail(self, batch: list[_Slice], failure: BaseException) -> None:
        first = True
        for request in dict.fromkeys(s.request for s in batch):
            if request.finished:
                continue
            request.error = failure if first else _own_copy(failure)
            first = False
            for queue in self._queues.values():  # its images not yet taken are not worth a forward any more
                if request in queue:
                    queue.remove(request)
