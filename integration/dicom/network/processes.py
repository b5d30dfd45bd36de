"""More DICOM listener processes on the same port, so parallel associations use more than one core.

One Python process runs one association's Python work at a time (the GIL), however many
associations it serves. With ``MEDBRIDGE_DICOM_PROCESSES=N`` the runtime's own listener (process 0)
binds its port with SO_REUSEPORT and :class:`ListenerProcesses` starts N-1 more, each a
:class:`~integration.dicom.network.listener.DicomListener` on that port with its own receive journal and its
own connection to the store; the kernel spreads incoming associations across them. They share
nothing else: studies they receive are announced by process 0's publisher from the store's change
trackers (within its poll interval), and C-FIND/C-GET/C-MOVE answer from the same store.

Children are spawned (not forked: the parent runs threads and an event loop) and stop on SIGTERM,
checkpointing their journals. The TLS port stays with process 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
from typing import Any

from integration import phi
from integration.app.settings import Settings
from integration.datadir import keep_private

log = logging.getLogger(__name__)


class ListenerProcesses:
    """Processes 1..N-1 of the DICOM listener; ``start()`` once process 0 listens on ``port``."""

    def __init__(self, settings: Settings, count: int, port: int) -> None:
        self.settings = settings
        self.count = count
        self.port = port
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[Any] = []
        # associations each process accepted on the storage path (index 0 unused: the parent counts its own)
        self.accepted = self._context.Array("q", count)

    def start(self) -> None:
        config = self.settings.model_dump()
        for index in range(1, self.count):
            ready = self._context.Event()
            process = self._context.Process(
                target=serve_listener, args=(config, index, self.port, ready, self.accepted),
                name=f"medbridge-dicom-{index}", daemon=True,
            )
            process.start()
            self._processes.append(process)
            if not ready.wait(120):
                raise RuntimeError(f"DICOM listener process {index} did not start; see its log above")
        log.info("%d more DICOM listener processes on port %d", len(self._processes), self.port)

    def stop(self) -> None:
        for process in self._processes:
            process.terminate()  # SIGTERM: the child stops its listener and checkpoints its journal
        for process in self._processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        self._processes = []

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._processes)


def serve_listener(config: dict[str, Any], index: int, port: int, ready: Any, accepted: Any) -> None:
    """The child: one listener on ``port`` until SIGTERM."""
    from integration.db.store import Store
    from integration.dicom.network.listener import DicomListener

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s dicom-{index} %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it can print identifiers
    settings = Settings.model_validate(config)
    keep_private()  # as the parent (spawned: nothing of its setup is inherited)
    phi.install_key(phi.load_or_create_key(settings.data_dir))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = multiprocessing.parent_process()
    if parent is not None:
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
