"""Several DICOM listener processes on one port (MEDBRIDGE_DICOM_PROCESSES): associations spread over
them, each instance is stored once, and a process that dies leaves a journal the next start replays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import delete, func, select

from integration.app.settings import Settings
from integration.db.store import Store
from integration.db.tables import DicomInstance
from integration.dicom.network.listener import DicomListener
from integration.dicom.network.processes import ListenerProcesses
from integration.observability import multiprocess
from tests.conftest import free_port


def make_shares(folder: Path, associations: int, per_association: int) -> list[list[str]]:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    shares: list[list[str]] = []
    for a in range(associations):
        share = []
        for i in range(per_association):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / f"{a}-{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            share.append(str(path))
        shares.append(share)
    return shares


def send_in_parallel(port: int, shares: list[list[str]]) -> None:
    procs = [subprocess.Popen(["storescu", "-aec", "MEDBRIDGE", "127.0.0.1", str(port), *share],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for share in shares]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""


def instances_counted(settings: Settings) -> float:
    """medbridge_dicom_instances_total over every label, as /metrics shows it."""
    text = multiprocess.exposition([multiprocess.folder(settings.data_dir)]).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "medbridge_dicom_instances"]
    return sum(s.value for s in family.samples if s.name == "medbridge_dicom_instances_total")


def count_rows(store: Store) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(DicomInstance)) or 0)


def test_two_processes_share_the_port_and_a_killed_ones_journal_is_replayed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", dicom_host="127.0.0.1", dicom_port=free_port(),
                        dicom_processes=2, dicom_journal_bytes=8 << 20, study_quiet_seconds=60,
                        database_url=f"sqlite:///{tmp_path / 'store.db'}")
    store = Store(settings.effective_database_url)
    store.start()
    main = DicomListener.from_settings(store, settings)
    main.start()
    more = ListenerProcesses(settings, 2, main.port)
    more.start()
    try:
        counted_before = instances_counted(settings)
        shares = make_shares(tmp_path, associations=16, per_association=2)
        send_in_parallel(main.port, shares)
        served_by_main = main.storage_associations.accepted  # type: ignore[union-attr]
        served_by_child = more.accepted[1]
        assert served_by_main + served_by_child == 16
        assert served_by_main > 0 and served_by_child > 0, "the kernel spread the associations over both"
        assert count_rows(store) == 32
        # /metrics counts every instance, whichever process took it (the child's counts summed in)
        assert instances_counted(settings) == counted_before + 32
        # the child dies without a checkpoint; then the store loses every row and file (the worst case)
        os.kill(more._processes[0].pid, signal.SIGKILL)
        more._processes[0].join(10)
    finally:
        more.stop()
        main.stop()
    with store.session() as s:
        s.execute(delete(DicomInstance))
    for path in settings.dicom_dir.rglob("*.dcm"):
        path.unlink()

    # one process now: its start replays the dead process's journal as well as its own (checkpointed)
    single = DicomListener.from_settings(store, settings.model_copy(update={"dicom_processes": 1}))
    single.start()
    single.stop()
    store.stop()
    assert count_rows(store) == 2 * served_by_child
    restored = list(settings.dicom_dir.rglob("*.dcm"))
    assert len(restored) == 2 * served_by_child


PARENT = """
import sys, time
from pathlib import Path
from integration.dicom.network.processes import ListenerProcesses
from integration.app.settings import Settings
from integration.db.store import Store
settings = Settings(data_dir=Path(sys.argv[1]), dicom_host="127.0.0.1", dicom_port=int(sys.argv[2]),
                    dicom_processes=2, dicom_journal_bytes=1 << 20, database_url=sys.argv[3])
Store(settings.effective_database_url).start()
more = ListenerProcesses(settings, 2, settings.dicom_port)
more.start()
print(more._processes[0].pid, flush=True)
time.sleep(600)
"""


def test_listener_processes_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "var"), str(free_port()),
                               f"sqlite:///{tmp_path / 'store.db'}"], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child), "an orphaned listener process would keep the port and its journal"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone: it no longer runs (its parent, killed, cannot reap it; init will)
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[1][0] != "Z"


def test_a_killed_listener_process_is_started_again_and_serves(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", dicom_host="127.0.0.1", dicom_port=free_port(),
                        dicom_processes=2, dicom_journal_bytes=1 << 20, study_quiet_seconds=60,
                        database_url=f"sqlite:///{tmp_path / 'store.db'}")
    store = Store(settings.effective_database_url)
    store.start()
    main = DicomListener.from_settings(store, settings)
    main.start()
    more = ListenerProcesses(settings, 2, main.port)
    more.start()
    try:
        first = more._processes[0].pid
        assert more.alive()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while more.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not more.alive(), "/health is red while a listener process is down"
        deadline = time.monotonic() + 60
        while not (more.alive() and more.restarts == 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert more.alive() and more._processes[0].pid != first, "started again"
        # the new process takes its share of associations again
        before = more.accepted[1]
        shares = make_shares(tmp_path, associations=12, per_association=1)
        send_in_parallel(main.port, shares)
        assert count_rows(store) == 12
        assert more.accepted[1] > before, "the kernel hands the restarted process associations"
    finally:
        more.stop()
        main.stop()
        store.stop()
