"""Nothing lost, nothing stuck (issue 16): each fault injected into `medbridge run` while DICOM,
FHIR and review traffic flows, then the counts of what was acknowledged but lost, delivered zero
times or twice. Every count is expected to be zero.

Run alone with ``pytest -m faults``; ``bench/faults.py`` runs the full-length variants. The
runtime's log is in each test's tmp dir (``medbridge.log``); a failure prints its tail.

Needs root: the full-disk fault mounts a tmpfs (it skips, saying so, where it cannot) and the private
PostgreSQL cluster runs as the ``postgres`` user (``runuser``). Outage lengths in CI:
MEDBRIDGE_FAULTS_DB_DOWN_S (30) and MEDBRIDGE_FAULTS_UPSTREAM_DOWN_S (20).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.stack import Durations, FaultStack, explain, run_fault
from tests.faults.traffic import Plan

# bench/faults.py's outages are minutes long (and its settle time 10 minutes)
pytestmark = [pytest.mark.faults,
              pytest.mark.timeout(3600 if os.environ.get("MEDBRIDGE_FAULTS_SCALE") == "bench" else 900)]


def plan(d: Durations, span_s: float, **more: Any) -> Plan:
    """The CI traffic, paced so that it is still flowing when a fault of ``span_s`` ends."""
    return Plan(studies=d.studies, instances=d.instances, bundles=d.bundles, span_s=span_s + 3,
                deadline_s=span_s + 180, **more)


def assert_all_zero(result: Any, stack: FaultStack, *also: str) -> None:
    problems = result.counts.nonzero()
    problems.update({k: v for k, v in result.notes.items() if k in also and v})
    assert not problems and result.recovery_seconds is not None, explain(result, stack)


# (a) ----------------------------------------------------------------------------------------------
def test_sigkill_of_the_runtime_mid_traffic_loses_nothing_and_it_restarts_as_it_is(
        stacks: Any, durations: Durations) -> None:
    stack = stacks.make("kill")

    def kill_and_restart() -> dict[str, Any]:
        stack.process.kill()
        time.sleep(0.5)
        orphans = stack.process.leftovers()
        notes: dict[str, Any] = {"orphans_after_kill": len(orphans),
                                 "orphan_commands": [stack.process.seen[p][:60] for p in orphans]}
        try:
            stack.process.start()  # same data dir, database and ports: nothing cleaned up by hand
            notes["restart_refused"] = 0
        except RuntimeError as exc:
            # counted, then the orphans are ended (what an operator would do) so that the losses are counted too
            notes["restart_refused"] = 1
            notes["restart_error"] = str(exc).splitlines()[-1][:200]
            stack.process.end_leftovers()
            stack.process.start()
        return notes

    result = run_fault("sigkill-runtime", stack, plan(durations, 10), kill_and_restart, durations, lead_s=4)
    assert_all_zero(result, stack, "orphans_after_kill", "restart_refused")


# (c) ----------------------------------------------------------------------------------------------
def test_sigkill_of_the_embedded_broker_is_survived(stacks: Any, durations: Durations) -> None:
    stack = stacks.make("broker")

    def kill_broker() -> dict[str, Any]:
        pid = stack.process.broker_pid()
        os.kill(pid, signal.SIGKILL)
        time.sleep(5)
        status, body = stack.process.health()
        return {"health_after_5s": status, "broker_pid_killed": pid}

    result = run_fault("sigkill-broker", stack, plan(durations, 8), kill_broker, durations)
    assert_all_zero(result, stack)


# (d) ----------------------------------------------------------------------------------------------
def test_postgresql_down_for_a_while_loses_nothing(stacks: Any, durations: Durations) -> None:
    stack = stacks.make("postgres")

    def database_outage() -> dict[str, Any]:
        stack.postgres.stop()
        time.sleep(durations.database_down)
        stack.postgres.start()
        return {}

    # while the database is away, 503 (transient, retry) is the right answer to a write
    result = run_fault("postgresql-down", stack, plan(durations, durations.database_down), database_outage,
                       durations, allowed_5xx=(503,))
    assert_all_zero(result, stack)


# (g) ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    """A 96 MiB tmpfs as the data dir (root only: `mount -t tmpfs`)."""
    mountpoint = tmp_path / "var"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("the full-disk fault mounts a tmpfs: it needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(folder: Path) -> Path:
    """Writes zeros into ``folder`` until the file system refuses (ENOSPC); the filler's path."""
    filler = folder / "filler"
    chunk = b"\0" * (1024 * 1024)
    # unbuffered: a buffered file's close flushes what did not fit and raises ENOSPC itself
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                if os.write(fd, chunk) == 0:
                    break
            except OSError:  # ENOSPC: the disk is full
                break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_refuses_with_the_right_status_and_recovers(stacks: Any, durations: Durations,
                                                                small_tmpfs: Path) -> None:
    # SQLite in the data dir, so that the database is on the full disk too
    stack = stacks.make("disk", engine="sqlite", data_dir=small_tmpfs)

    def disk_full() -> dict[str, Any]:
        filler = fill(small_tmpfs)
        time.sleep(durations.disk_full)
        filler.unlink()
        return {}

    result = run_fault("disk-full", stack, plan(durations, durations.disk_full), disk_full, durations,
                       allowed_5xx=(503, 507))
    wrong = {why: n for why, n in result.counts.detail["dicom_refusals"].items() if why != "status 0xA700"}
    result.notes["wrong_dicom_refusals"] = sum(wrong.values())
    assert_all_zero(result, stack, "wrong_dicom_refusals")


# (b), (e), (f), (h): MedBridge keeps running; one stack, each run counts its own items ----------------
def barrage(port: int, seconds: float, idle: int = 50) -> dict[str, Any]:
    """``idle`` TCP connections that send nothing (reopened as the server closes them) and random bytes
    on more connections, for ``seconds``."""
    stop = time.monotonic() + seconds
    sent = {"idle_connections": 0, "garbage_connections": 0}

    def hold_idle() -> None:
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    sent["idle_connections"] += 1
                    s.settimeout(max(0.1, stop - time.monotonic()))
                    try:
                        s.recv(1)  # until the server closes it or the barrage ends
                    except (TimeoutError, OSError):
                        pass
            except OSError:
                time.sleep(0.2)

    def garbage() -> None:
        rng = random.Random(16)
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    sent["garbage_connections"] += 1
                    s.sendall(rng.randbytes(rng.randint(1, 4096)))
                    time.sleep(0.1)
            except OSError:
                time.sleep(0.1)

    threads = [threading.Thread(target=hold_idle, daemon=True) for _ in range(idle)]
    threads += [threading.Thread(target=garbage, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent


def test_idle_connections_and_random_bytes_on_the_dicom_port_do_not_lock_out_a_good_sender(
        shared_stack: FaultStack, durations: Durations) -> None:
    stack = shared_stack
    result = run_fault("dicom-barrage", stack, plan(durations, durations.barrage),
                       lambda: barrage(stack.process.dicom_port, durations.barrage), durations, lead_s=1)
    result.notes["good_instances_refused"] = sum(result.counts.detail["dicom_refusals"].values())
    assert_all_zero(result, stack, "good_instances_refused")


def test_upstream_ehr_down_delays_but_loses_no_writeback(shared_stack: FaultStack, durations: Durations) -> None:
    stack = shared_stack

    def upstream_outage() -> dict[str, Any]:
        stack.proxy.set_mode("refuse")
        time.sleep(durations.upstream_down)
        stack.proxy.set_mode("pass")
        return {}

    result = run_fault("upstream-down", stack, plan(durations, durations.upstream_down), upstream_outage,
                       durations, lead_s=1)
    assert_all_zero(result, stack)


def test_export_pacs_down_delays_but_loses_no_export(shared_stack: FaultStack, durations: Durations) -> None:
    stack = shared_stack

    def pacs_outage() -> dict[str, Any]:
        stack.orthanc.stop()
        time.sleep(durations.pacs_down)
        stack.orthanc.start()
        return {}

    result = run_fault("pacs-down", stack, plan(durations, durations.pacs_down), pacs_outage, durations, lead_s=1)
    assert_all_zero(result, stack)


def test_a_hostile_study_among_good_ones_holds_none_of_them_back(shared_stack: FaultStack,
                                                                 durations: Durations) -> None:
    # last on the shared stack: today the hostile study may stall every later one
    stack = shared_stack
    result = run_fault("hostile-study", stack, plan(durations, 3, hostile_studies=1), lambda: None, durations,
                       lead_s=0)
    assert_all_zero(result, stack)
