"""The composition root: builds everything from one Settings object, starts the edges in order,
stops them in reverse.

Order: store -> DICOM journal replay -> broker -> topics -> outbox relay -> publishers -> workers ->
DICOM listener -> HTTP -> viewer. The listeners start last so nothing arrives before it can be
handled; on stop, they close first so nothing arrives while the rest shuts down. The journal is
replayed before any publisher runs, so a study a crash interrupted is announced once, whole.

Every loop runs under supervision (integration.events.supervision) and the embedded broker is
watched and restarted; /health names what is down. Child processes die with the runtime
(integration.lifetime). The imaging and clinical workers run in supervised processes of their own at
a lower priority (integration.app.workers), so inference does not slow the listeners; with
MEDBRIDGE_EDGES=false a process runs only its workers, for an edges process elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from integration import phi
from integration.app.http import create_app
from integration.app.services import Services
from integration.app.settings import Settings
from integration.app.workers import INFERENCE_ROLES, InferenceProcesses, become_worker_process
from integration.audit.syslog import SyslogForwarder
from integration.datadir import keep_private, private_folder
from integration.db.store import Store
from integration.delivery.ehr.sender import UpstreamSender
from integration.delivery.pacs.sender import DicomExportSender, ExportPolicy, export_peers
from integration.delivery.sender import DeliverySender
from integration.dicom.network.listener import DicomListener, tls_context
from integration.dicom.network.processes import ListenerProcesses
from integration.events.consumer import ConsumerOptions
from integration.events.embedded import EmbeddedBroker
from integration.events.publisher import QuietPeriodPublisher, announce_record, announce_study
from integration.events.relay import OutboxRelay
from integration.events.supervision import Supervised, rate_limit_logger
from integration.events.topics import ensure_topics
from integration.fhir import storage as fhir_storage
from integration.fhir.validation import ValidationWorkers
from integration.lifetime import die_with_parent_of
from integration.observability import tracing
from integration.reports.legacy_heatmaps import adopt_heatmap_files
from integration.reports.writer import ReportWriter
from schemas.events import CONSUMER_OF_TOPIC

log = logging.getLogger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # the runtime owns SIGINT/SIGTERM and stops uvicorn in order
        yield


class Runtime:
    def __init__(self, settings: Settings, *, with_viewer: bool | None = None) -> None:
        self.settings = settings
        self.with_viewer = settings.viewer_enabled if with_viewer is None else with_viewer
        self.store = Store(settings.effective_database_url)
        self.embedded: EmbeddedBroker | None = None
        self.bootstrap = settings.kafka_bootstrap_servers
        self.relay: OutboxRelay | None = None
        self.dicom: DicomListener | None = None
        self.http: _EmbeddedUvicorn | None = None
        self.http_port = settings.http_port  # the port bound once started (settings may say 0: any)
        self._http_task: asyncio.Task[None] | None = None
        self.viewer: subprocess.Popen[bytes] | None = None
        self.components: list[tuple[str, Callable[[], Awaitable[None] | None]]] = []  # stop callbacks
        self.health: dict[str, Callable[[], bool]] = {}
        self.health_details: dict[str, Callable[[], object]] = {}  # shown by /health beside the checks
        self.metrics_text: list[Callable[[], str]] = []  # more /metrics lines
        self.workers: dict[str, Any] = {}
        self.upstream: UpstreamSender | None = None
        self.senders: list[DeliverySender] = []  # one per destination kind (EHR, PACS)
        self.publishers: dict[str, QuietPeriodPublisher] = {}
        self.broker_watch: Supervised | None = None
        self.inference_processes: InferenceProcesses | None = None  # the inference workers' own processes

    def notify_outbox(self) -> None:
        if self.relay:
            self.relay.wake()
        for sender in self.senders:
            sender.wake()  # a write may have queued a delivery

    def _study_ready(self) -> None:
        """The listener's "studies are due" (association threads): wakes the study publisher once it runs."""
        publisher = self.publishers.get("study")
        if publisher is not None:
            publisher.wake()

    def _dlq_producer(self) -> Any:
        return self.relay.producer if self.relay else None

    async def start(self) -> None:
        s = self.settings
        keep_private()  # the data dir holds patient data: what this process creates there is its own
        for folder in (s.data_dir, s.dicom_dir, s.models_dir):
            private_folder(folder)
        # identifiers in logs are hashed with this data dir's key (made at first start, 0600)
        phi.install_key(phi.load_or_create_key(s.data_dir))

        await asyncio.to_thread(self.store.start)
        self.components.append(("store", self.store.stop))
        await asyncio.to_thread(fhir_storage.prepare, self.store)  # resources from before the search index
        if s.edges_enabled:
            await asyncio.to_thread(adopt_heatmap_files, self.store, s.data_dir)  # results from before artifacts

        rate_limit_logger("aiokafka")  # a dead broker: one line per interval, not 200 a second
        # the loops that retry through an outage say so once per interval, not once per round
        for loop_logger in ("integration.events.publisher", "integration.events.relay", "integration.delivery.sender"):
            rate_limit_logger(loop_logger, min_level=logging.WARNING)

        if s.dicom_enabled and s.edges_enabled:
            # built now, started last: its journal is replayed before any publisher can announce a study
            self.dicom = DicomListener.from_settings(self.store, s, tls=dicom_tls(s), on_study_ready=self._study_ready)
            await asyncio.to_thread(self.dicom.recover)

        if not self.bootstrap and not s.edges_enabled:
            raise ValueError("a workers-only process (MEDBRIDGE_EDGES=false) needs KAFKA_BOOTSTRAP_SERVERS: the "
                             "broker of the edges process it works for")
        if not self.bootstrap:
            self.embedded = EmbeddedBroker(s.embedded_kafka_port, pid_file=s.data_dir / "kafka-broker.pid")
            # started on the loop's thread, not a worker thread: the broker's parent-death signal follows
            # the thread that forked it (start waits for the port: milliseconds for tansu)
            self.embedded.start()
            self.components.append(("embedded broker", self.embedded.stop))
            self.bootstrap = self.embedded.bootstrap_servers
            self.health["embedded_broker"] = self.embedded.alive
        await ensure_topics(self.bootstrap, s.kafka_partitions)
        if not s.edges_enabled:
            await self._start_workers()  # workers only: the edges process publishes what they store
            log.info("MedBridge workers up (%s), broker %s", s.workers, self.bootstrap)
            return

        self.relay = OutboxRelay(
            self.store, self.bootstrap, s.outbox_poll_seconds,
            consumers_by_topic=CONSUMER_OF_TOPIC, redeliver_after_seconds=s.redeliver_after_seconds,
            partitions=s.kafka_partitions,
        )
        await self.relay.start()
        self.components.append(("outbox relay", self.relay.stop))
        relay = self.relay
        self.health["broker"] = lambda: relay.running() and relay.last_error is None
        self.health["outbox_relay"] = relay.running
        if self.embedded is not None:
            self.broker_watch = Supervised("embedded broker watch", self._watch_broker)
            self.broker_watch.start()
            self.components.append(("embedded broker watch", self.broker_watch.stop))

        publishers = self.publishers
        for kind, quiet, max_wait, announce in (
            ("study", s.study_quiet_seconds, None, announce_study),
            ("patient", s.record_quiet_seconds, s.record_max_wait_seconds or None, announce_record),
        ):
            pub = QuietPeriodPublisher(self.store, kind, quiet, announce, on_announced=self.notify_outbox,
                                       max_wait_seconds=max_wait)
            await pub.start()
            publishers[kind] = pub
            self.components.append((f"{kind} publisher", pub.stop))
            self.health[f"{kind}_publisher"] = pub.running

        await self._start_workers()

        if self.dicom is not None:
            await asyncio.to_thread(self.dicom.start)
            self.components.append(("DICOM listener", self.dicom.stop))
            self.health["dicom_listener"] = self.dicom.running
            self.health["disk_space"] = self.dicom.has_free_space
            # saturated (every association slot taken, or a limit refused a sender in the last seconds)
            # is shown, not failed: a liveness probe must not restart a listener for being busy
            listener = self.dicom
            self.health_details["dicom_listener"] = listener.gate.status
            # false while instances are refused: a journal sync failed, or rows wait for the database
            self.health["dicom_ingest"] = lambda: listener.ingest.failure() is None
            self.health_details["dicom_ingest"] = lambda: {"failure": listener.ingest.failure()}
            self.metrics_text.append(listener.metrics_text)
            if s.dicom_processes > 1:
                more = ListenerProcesses(s, s.dicom_processes, self.dicom.port)
                await asyncio.to_thread(more.start)
                self.components.append(("DICOM listener processes", more.stop))
                self.health["dicom_listener_processes"] = more.alive

        validation = ValidationWorkers(s.fhir_validation_workers)
        self.components.append(("FHIR validation workers", validation.stop))
        audit_forward = None
        if s.audit_syslog and s.audit_enabled:
            forwarder = SyslogForwarder(s.audit_syslog, s.audit_syslog_ca)  # refuses a malformed address
            forwarder.start()
            self.components.append(("audit syslog", forwarder.stop))
            audit_forward = forwarder.forward
        services = Services(
            s, self.store, self.health, self.notify_outbox,
            on_study_ready=publishers["study"].wake,  # STOW-RS studies announce like C-STORE'd ones
            fhir_validation=validation, audit_forward=audit_forward,
            health_details=self.health_details, metrics_text=self.metrics_text,
        )
        config = uvicorn.Config(
            create_app(services), host=s.http_host, port=s.http_port, log_level="warning", lifespan="off",
            access_log=False,  # URLs carry patient references
        )
        self.http = _EmbeddedUvicorn(config)
        self._http_task = asyncio.create_task(self.http.serve(), name="http")
        while not self.http.started:
            if self._http_task.done():
                self._http_task.result()  # raises the bind error
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.05)
        self.http_port = self.http.servers[0].sockets[0].getsockname()[1]  # the bound one, when 0 asked for any
        self.components.append(("HTTP server", self._stop_http))

        if self.with_viewer:
            self._start_viewer()
        log.info("MedBridge up: HTTP http://%s:%d, broker %s", s.http_host, self.http_port, self.bootstrap)

    async def _watch_broker(self) -> None:
        """Restart the embedded broker when it dies, recreate the topics, and have the outbox republish
        everything unprocessed (the broker kept it in memory). Runs under supervision: a restart that
        fails raises, and the next try comes after a backoff while /health shows the broker down."""
        assert self.embedded is not None and self.relay is not None
        while True:
            if not self.embedded.alive():
                log.error("embedded broker died; restarting it")
                self.embedded.restart()  # on the loop's thread, as at start (see start())
                await ensure_topics(self.bootstrap, self.settings.kafka_partitions)
                self.relay.broker_restarted()
                log.warning("embedded broker restarted (restart %d); republishing what was not processed",
                            self.embedded.restarts)
            await asyncio.sleep(1.0)

    async def _start_workers(self) -> None:
        """The workers MEDBRIDGE_WORKERS names; an edges process runs the inference ones in processes of
        their own unless MEDBRIDGE_INFERENCE_PROCESSES is false (integration.app.workers)."""
        s = self.settings
        assert self.bootstrap
        options = ConsumerOptions(
            bootstrap=self.bootstrap,
            group_prefix=s.kafka_group_prefix,
            max_attempts=s.consumer_max_attempts,
            notify_outbox=self.notify_outbox,
            dead_letter_producer=self._dlq_producer,
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
        )
        if s.upstream_urls:
            self.upstream = UpstreamSender(self.store, s)  # refuses incomplete upstream settings
            await self._start_sender("upstream_writeback", self.upstream)
        if "dicom-export" in s.enabled_workers and export_peers(s.dicom_peers):
            exporter = DicomExportSender(self.store, s.dicom_peers, ExportPolicy.from_settings(s))
            await self._start_sender("dicom_exporter", exporter)
        if "reports" in s.enabled_workers:
            await self._start_worker("report_writer", ReportWriter(self.store, s, options))
        in_children = s.edges_enabled and s.inference_processes
        if in_children:
            roles = tuple(r for r in INFERENCE_ROLES if r in s.enabled_workers)
            if roles:
                processes = InferenceProcesses(s, self.bootstrap, roles, serve_worker_process)
                await processes.start()
                self.inference_processes = processes
                self.components.append(("inference worker processes", processes.stop))
                for role in roles:
                    self.health[f"{role}_worker"] = lambda role=role: processes.alive(role)  # type: ignore[misc]
            return
        if "imaging" in s.enabled_workers:
            from inference.imaging.worker import ImagingWorker  # torch stays out of edge-only processes

            await self._start_worker("imaging_worker", ImagingWorker(self.store, s, options))
        if "clinical" in s.enabled_workers:
            from inference.clinical.worker import ClinicalWorker

            await self._start_worker("clinical_worker", ClinicalWorker(self.store, s, options))

    async def _start_worker(self, name: str, worker: Any) -> None:
        await worker.start()
        self.workers[name] = worker
        self.components.append((name, worker.stop))
        self.health[name] = worker.running

    async def _start_sender(self, name: str, sender: DeliverySender) -> None:
        await sender.start()
        self.senders.append(sender)
        self.workers[name] = sender
        self.components.append((name, sender.stop))
        self.health[name] = sender.running

    async def _stop_http(self) -> None:
        if self.http and self._http_task:
            self.http.should_exit = True
            await self._http_task

    def _start_viewer(self) -> None:
        s = self.settings
        script = Path(__file__).resolve().parents[2] / "viewer" / "app.py"
        # the viewer is a process of its own: its settings (viewer.settings.ViewerSettings) reach it by environment
        env = {**os.environ, "MEDBRIDGE_API_URL": f"http://{s.http_host}:{self.http_port}"}
        self.viewer = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(s.viewer_port),
             "--server.address", s.viewer_host,
             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent_of(os.getpid()),  # a SIGKILL of the runtime takes the viewer along
        )
        viewer = self.viewer
        self.components.append(("viewer", self._stop_viewer))
        self.health["viewer"] = lambda: viewer.poll() is None

    def _stop_viewer(self) -> None:
        if self.viewer and self.viewer.poll() is None:
            self.viewer.terminate()
            try:
                self.viewer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.viewer.kill()

    async def stop(self) -> None:
        for name, stop in reversed(self.components):
            try:
                result = stop()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # noqa: BLE001 - keep stopping the rest
                log.exception("stopping %s failed", name)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled ourselves
                # aiokafka's consumer.stop() can leak its fetch task's cancellation after a broker loss
                log.warning("stopping %s was cut short (a cancellation inside it); going on", name)
        self.components.clear()


def serve_worker_process(config: dict[str, Any], parent_pid: int, nice: int, threads: int, ready: Any) -> None:
    """Main of an inference worker process (integration.app.workers): a workers-only runtime until SIGTERM;
    ``ready`` is set once its workers consume."""
    settings = Settings.model_validate(config)
    become_worker_process(parent_pid, nice, threads, settings.workers, settings.log_format)
    stop_tracing = tracing.configure("medbridge", settings.trace_file)  # its consumers continue the traces
    try:
        asyncio.run(_serve_workers(settings, ready))
    finally:
        stop_tracing()


async def _serve_workers(settings: Settings, ready: Any) -> None:
    runtime = Runtime(settings)
    stop = asyncio.Event()
    # Ctrl-C reaches the whole process group: the parent stops this process in order, by SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await runtime.start()
        ready.set()
        await stop.wait()
    finally:
        await runtime.stop()


def dicom_tls(s: Settings) -> Any:
    """The DICOM TLS context when a TLS port is configured (cert and key then required)."""
    if s.dicom_tls_port is None:
        return None
    if s.dicom_tls_cert is None or s.dicom_tls_key is None:
        raise ValueError("MEDBRIDGE_DICOM_TLS_PORT needs MEDBRIDGE_DICOM_TLS_CERT and MEDBRIDGE_DICOM_TLS_KEY")
    return tls_context(s.dicom_tls_cert, s.dicom_tls_key, s.dicom_tls_client_ca)
