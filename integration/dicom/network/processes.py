"""More DICOM listener processes on the same port, so parallel associations use more than one core.

One Python process runs one association's Python work at a time (the GIL), however many
associations it serves. With ``MEDBRIDGE_DICOM_PROCESSES=N`` the runtime's own listener (process 0)
binds its port with SO_REUSEPORT and :class:`ListenerProcesses` starts N-1 more, each a
:class:`~integration.dicom.network.listener.DicomListener` on that port with its own receive journal and its
own connection to the store; the kernel spreads incoming associations across them. They share
nothing else: studies they receive are announced by process 0's publisher from the store's change
trackers (within its poll interval), and C-FIND/C-GET/C-MOVE answer from the same store.

Children are spawned (not forked: the parent runs threads and an event loop) and stop on SIGTERM,
checkpointing their journals. The TLS port stays with process 0. A child that dies is started again
by a supervisor thread, after a backoff that doubles per quick death (1 s up to 60 s); ``alive()``
is false (``/health`` red) until it is back. Children die with the parent: ``PR_SET_PDEATHSIG``
sends them SIGTERM when it goes (even by SIGKILL), and a thread watching the parent does the same
where prctl is not available. The supervisor thread spawns every child, since the death signal
follows the thread that forked, and it lives as long as the processes do.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from pathlib import Path
from typing import Any

from integration import phi
from integration.app.settings import Settings
from integration.datadir import keep_private
from integration.events.supervision import backoff_seconds
from integration.lifetime import die_with_parent
from integration.observability import logs, multiprocess, tracing

log = logging.getLogger(__name__)


class ListenerProcesses:
    """Processes 1..N-1 of the DICOM listener; ``start()`` once process 0 listens on ``port``."""

    def __init__(self, settings: Settings, count: int, port: int) -> None:
        self.settings = settings
        self.count = count
        self.port = port
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[Any] = []  # process i at [i - 1]
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._restarting: set[int] = set()  # indexes dead and waiting to start again
        self.restarts = 0
        # associations each process accepted on the storage path (index 0 unused: the parent counts its own)
        self.accepted = self._context.Array("q", count)

    def start(self) -> None:
        """Start processes 1..N-1 and their supervisor; returns once all listen (or raises)."""
        self._stopping.clear()
        multiprocess.prepare(multiprocess.folder(self.settings.data_dir))  # where their counts go (/metrics)
        started = threading.Event()
        failure: list[BaseException] = []
        self._supervisor = threading.Thread(target=self._supervise, args=(started, failure),
                                            name="dicom-listener-supervisor", daemon=True)
        self._supervisor.start()
        started.wait()
        if failure:
            self.stop()
            raise failure[0]
        log.info("%d more DICOM listener processes on port %d", len(self._processes), self.port)

    def _spawn(self, index: int) -> Any:
        ready = self._context.Event()
        process = self._context.Process(
            target=serve_listener, args=(self.settings.model_dump(), index, self.port, ready, self.accepted),
            name=f"medbridge-dicom-{index}", daemon=True,
        )
        process.start()
        if not ready.wait(120):
            process.kill()
            raise RuntimeError(f"DICOM listener process {index} did not start; see its log above")
        return process

    def _supervise(self, started: threading.Event, failure: list[BaseException]) -> None:
        """Spawn the children, then start again each one that dies (until ``stop()``)."""
        try:
            for index in range(1, self.count):
                self._processes.append(self._spawn(index))
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it
            failure.append(exc)
            return
        finally:
            started.set()
        quick_deaths = [0] * self.count
        born = [time.monotonic()] * self.count
        while not self._stopping.is_set():
            multiprocessing.connection.wait([p.sentinel for p in self._processes], timeout=0.5)
            for slot, process in enumerate(self._processes):
                if process.is_alive() or self._stopping.is_set():
                    continue
                index = slot + 1
                quick_deaths[index] = quick_deaths[index] + 1 if time.monotonic() - born[index] < 60 else 1
                delay = backoff_seconds(quick_deaths[index], base=RESTART_BASE_SECONDS, cap=RESTART_MAX_SECONDS)
                log.error("DICOM listener process %d died (exit code %s); starting it again in %.0f s",
                          index, process.exitcode, delay)
                self._restarting.add(index)
                if self._stopping.wait(delay):
                    return
                try:
                    self._processes[slot] = self._spawn(index)
                except (RuntimeError, OSError) as exc:
                    log.error("DICOM listener process %d could not be started again: %s", index, exc)
                    continue  # still dead: the next round waits longer
                born[index] = time.monotonic()
                self._restarting.discard(index)
                self.restarts += 1
                log.info("DICOM listener process %d is back", index)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(130)  # it may be waiting for a child it is starting
            self._supervisor = None
        for process in self._processes:
            process.terminate()  # SIGTERM: the child stops its listener and checkpoints its journal
        for process in self._processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        self._processes = []

    def alive(self) -> bool:
        return not self._restarting and all(p.is_alive() for p in self._processes)


RESTART_BASE_SECONDS = 1.0
RESTART_MAX_SECONDS = 60.0


def serve_listener(config: dict[str, Any], index: int, port: int, ready: Any, accepted: Any) -> None:
    """The child: one listener on ``port`` until SIGTERM."""
    # before anything imports the metric families: this process counts into files the parent sums
    multiprocess.count_into_files(multiprocess.folder(Path(config["data_dir"])))
    from integration.db.store import Store
    from integration.dicom.network.listener import DicomListener

    settings = Settings.model_validate(config)
    logs.install(settings.log_format, logging.INFO, f"%(asctime)s %(levelname)s dicom-{index} %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it can print identifiers
    stop_tracing = tracing.configure("medbridge", settings.trace_file)  # its associations begin traces too
    keep_private()  # as the parent (spawned: nothing of its setup is inherited)
    phi.install_key(phi.load_or_create_key(settings.data_dir))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        die_with_parent(parent.pid)
        # a parent killed outright must not leave us on the port, writing a journal its successor replays
        def watch_parent() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            stop.set()

        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    store = Store(settings.effective_database_url)
    store.start()
    listener = DicomListener.from_settings(store, settings, port=port, process_index=index)

    def count_accepted() -> None:
        with accepted.get_lock():
            accepted[index] += 1

    listener.on_storage_association = count_accepted
    listener.start()
    ready.set()
    try:
        stop.wait()
    finally:
        listener.stop()
        store.stop()
        stop_tracing()
