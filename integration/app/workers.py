"""Inference workers in processes of their own, so the edges keep their cores while a model runs.

On two cores, the imaging worker inferring one study in the runtime's process took the GIL and the
cores from the DICOM listener receiving the next: `make run` ingested at 0.41x dcmtk storescp against
0.90x for the edges alone (issue 19). :class:`InferenceProcesses` runs each inference worker role
(``imaging``, ``clinical``) in a spawned process that runs the runtime in workers-only mode
(``MEDBRIDGE_EDGES=false``) against the same database and broker, at a lower scheduling priority
(``MEDBRIDGE_INFERENCE_NICE``) and with a bounded number of torch/OpenMP threads
(``MEDBRIDGE_INFERENCE_THREADS``): when both want the CPU, the kernel gives it to the listeners.

Each child runs under :class:`~integration.events.supervision.Supervised`: one that dies is started
again after a backoff, and ``alive(role)`` (``/health``) is false meanwhile. Children die with the
runtime (``PR_SET_PDEATHSIG``, :mod:`integration.lifetime`) and stop on SIGTERM with it. Their results
reach the outbox in their own transactions; the runtime's outbox relay publishes them within
``MEDBRIDGE_OUTBOX_POLL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

from integration.app.settings import Settings
from integration.events.supervision import Supervised
from integration.lifetime import die_with_parent
from integration.observability import multiprocess

log = logging.getLogger(__name__)

INFERENCE_ROLES = ("imaging", "clinical")
START_TIMEOUT_SECONDS = 300.0  # a first start may load a large model from a slow disk
STOP_TIMEOUT_SECONDS = 30.0


def worker_process_settings(settings: Settings, role: str, bootstrap: str) -> Settings:
    """The settings of the workers-only process that runs ``role`` for the edges process of ``settings``."""
    return settings.model_copy(update={
        "edges_enabled": False, "inference_processes": False, "workers": role,
        "kafka_bootstrap_servers": bootstrap, "viewer_enabled": False, "dicom_enabled": False,
        "database_url": settings.effective_database_url, "data_dir": settings.data_dir.resolve(),
        "upstream_fhir_url": "",  # the edges process delivers; one writeback sender per deployment role
    })


class InferenceProcesses:
    """One supervised process per role in ``roles``; ``start()`` returns once each has loaded its model
    and joined its consumer group (or raises)."""

    def __init__(self, settings: Settings, bootstrap: str, roles: tuple[str, ...],
                 entry: Callable[[dict[str, Any], int, int, int, Any], None]) -> None:
        """``entry(config, parent_pid, nice, threads, ready)`` is the child's main (module-level, so that
        a spawned child can import it): it calls :func:`become_worker_process`, runs a workers-only
        runtime from ``Settings.model_validate(config)``, sets ``ready`` once it is up and stops on SIGTERM.
        """
        unknown = set(roles) - set(INFERENCE_ROLES)
        if unknown:
            raise ValueError(f"no inference role {sorted(unknown)}: choose among {', '.join(INFERENCE_ROLES)}")
        self.settings = settings
        self.bootstrap = bootstrap
        self.roles = roles
        self.entry = entry
        self._context = multiprocessing.get_context("spawn")  # the parent runs threads and an event loop
        self._processes: dict[str, Any] = {}
        self._ready: dict[str, asyncio.Event] = {}  # set once the role's first process is up, or failed
        self._failure: dict[str, str] = {}  # why a role's first process did not come up
        self._loops = {role: Supervised(f"{role} worker process", self._body(role), base_seconds=1.0,
                                        cap_seconds=60.0) for role in roles}

    async def start(self) -> None:
        # where the children count (prometheus-client multiprocess mode): /metrics sums them in
        multiprocess.prepare(multiprocess.folder(self.settings.data_dir, multiprocess.INFERENCE_PROCESSES))
        for role in self.roles:
            self._ready[role] = asyncio.Event()
            self._loops[role].start()
        for role in self.roles:
            try:
                await asyncio.wait_for(self._ready[role].wait(), START_TIMEOUT_SECONDS)
            except TimeoutError:
                self._failure.setdefault(role, f"not up in {START_TIMEOUT_SECONDS:.0f} s")
            if role in self._failure:
                await self.stop()
                raise RuntimeError(f"the {role} worker process did not start ({self._failure[role]}): see its log "
                                   "lines above (a missing model, an unreachable database)")
        log.info("inference worker processes up: %s", ", ".join(
            f"{role} (pid {self._processes[role].pid})" for role in self.roles))

    def _body(self, role: str) -> Any:
        async def run_one() -> None:
            await self._run_child(role)
        return run_one

    async def _run_child(self, role: str) -> None:
        """Start the role's process, wait until it is ready, then until it dies (the supervisor restarts it)."""
        ready = self._context.Event()
        config = worker_process_settings(self.settings, role, self.bootstrap).model_dump()
        process = self._context.Process(
            target=self.entry, name=f"medbridge-{role}",
            args=(config, os.getpid(), self.settings.inference_nice, self.settings.inference_threads, ready),
        )
        # started on the loop's thread (the runtime's lifetime): the parent-death signal follows it. The child
        # imports prometheus-client with the module of its entry, before any of its own code runs: the variable
        # that puts it in multiprocess mode (its counts summed into /metrics) must be in the environment it is
        # spawned with, and only there (this process counts in memory; later children must not inherit it)
        with _environment(multiprocess.ENV, str(multiprocess.folder(self.settings.data_dir,
                                                                     multiprocess.INFERENCE_PROCESSES))):
            process.start()
        self._processes[role] = process
        try:
            while not await asyncio.to_thread(ready.wait, 0.5):
                if not process.is_alive():
                    if not self._ready[role].is_set():  # the first start: start() reports it
                        self._failure[role] = f"exit code {process.exitcode}"
                        self._ready[role].set()
                    raise RuntimeError(f"the {role} worker process exited at start (code {process.exitcode})")
            self._ready[role].set()
            while process.is_alive():
                await asyncio.to_thread(process.join, 0.5)
            log.error("the %s worker process died (exit code %s); starting it again", role, process.exitcode)
        finally:
            if process.is_alive():  # cancelled: the runtime stops
                await asyncio.to_thread(_stop_process, process)

    async def stop(self) -> None:
        for loop in self._loops.values():
            await loop.stop()

    def alive(self, role: str) -> bool:
        process = self._processes.get(role)
        return process is not None and process.is_alive() and self._loops[role].running()

    def pid(self, role: str) -> int | None:
        process = self._processes.get(role)
        return process.pid if process is not None else None


def _stop_process(process: Any) -> None:
    process.terminate()  # SIGTERM: the child's runtime stops its consumer in order
    process.join(STOP_TIMEOUT_SECONDS)
    if process.is_alive():
        process.kill()
        process.join(5)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment while the block runs (a child spawned in it inherits it)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def become_worker_process(parent_pid: int, nice: int, threads: int, workers: str,
                          log_format: str = "text") -> None:
    """First thing in an inference worker process: die with the parent, yield the CPU to the edges, bound
    torch's threads (read when torch is imported, later, by the worker) and log with the role's name."""
    die_with_parent(parent_pid)
    with contextlib.suppress(OSError):
        os.nice(nice)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)  # no oversubscription of the cores the edges share
    from integration.observability import logs

    logs.install(log_format, logging.INFO, f"%(asctime)s %(levelname)s {workers}-worker %(name)s: %(message)s")  # type: ignore[arg-type]
    for noisy in ("aiokafka", "httpx", "chromadb", "sentence_transformers", "highdicom", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # it quotes values
