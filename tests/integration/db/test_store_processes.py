"""SQLite shared by several processes (MEDBRIDGE_DICOM_PROCESSES with the default database): every
commit of every process stays committed."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from sqlalchemy import func, select

from integration.db.store import Store
from integration.db.tables import DicomInstance, utcnow

ROWS_PER_PROCESS = 400


def instance_row(tag: str, i: int) -> dict[str, object]:
    return {"sop_instance_uid": f"1.2.826.0.1.{tag}.{i}", "study_instance_uid": f"1.2.826.0.2.{tag}.{i // 10}",
            "series_instance_uid": f"1.2.826.0.3.{tag}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1", "modality": "CT", "patient_id": None, "is_image": True,
            "path": f"/nowhere/{tag}/{i}.dcm", "size": 1, "received_at": utcnow()}


def write_rows(url: str, tag: str) -> None:
    store = Store(url)
    store.start()
    try:
        for i in range(0, ROWS_PER_PROCESS, 2):
            store.add_instances([instance_row(tag, i), instance_row(tag, i + 1)])
    finally:
        store.stop()


def test_rows_committed_by_two_processes_at_once_are_all_kept(tmp_path: Path) -> None:
    """Each process runs the store's WAL checkpointer, which reads SQLite's -shm file. It once opened
    and closed that file for every read, which dropped the process's POSIX locks on it and let the
    other process restart the WAL under it: committed rows vanished (about one run in four of the
    two-listener-process test lost some)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    parent = Store(url)
    parent.start()
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=write_rows, args=(url, f"p{n}")) for n in range(2)]
    for child in children:
        child.start()
    write_rows(url, "main")
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    with parent.session() as s:
        assert s.scalar(select(func.count()).select_from(DicomInstance)) == 3 * ROWS_PER_PROCESS
    parent.stop()
