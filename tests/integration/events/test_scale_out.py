"""Scale-out on real engines: imaging worker processes share one consumer group on PostgreSQL and the
embedded broker; one is SIGKILLed mid-run, its partitions move to the survivor, and every study gets
exactly one report."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from integration.app.runtime import Runtime
from integration.db.tables import AiResult, OutboxEntry
from integration.events.topics import partition_counts
from integration.lifetime import die_with_parent_of
from schemas.events import TOPIC_IMAGING_COMPLETED
from tests.conftest import stack_settings

REPO = Path(__file__).resolve().parents[3]
STUDIES = 10
IMAGES_PER_STUDY = 3  # enough work per study that a kill lands inside one
# a dead member leaves the group after this long (MEDBRIDGE_KAFKA_SESSION_TIMEOUT_MS): the test's pace
SESSION_TIMEOUT_MS = 2000


def worker_process(data_dir: Path, database_url: str, bootstrap: str, weights: Path,
                   log: Path) -> subprocess.Popen[bytes]:
    """A real `medbridge run` in workers-only mode running the imaging worker; its log in ``log``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MEDBRIDGE_EDGES": "false",
        "MEDBRIDGE_WORKERS": "imaging",
        "MEDBRIDGE_DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MEDBRIDGE_IMAGING_MODEL": str(weights),
        "MEDBRIDGE_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "MEDBRIDGE_KAFKA_HEARTBEAT_INTERVAL_MS": "300",
        "OMP_NUM_THREADS": "1",  # two shared cores
    }
    with log.open("wb") as out:  # a file, not a pipe: nobody reads a pipe after start-up, and a full one blocks
        return subprocess.Popen([sys.executable, "-m", "integration.app.cli", "run"], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=out,
                                preexec_fn=die_with_parent_of(os.getpid()))  # no orphan if pytest is killed


async def wait_until_up(process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while "MedBridge workers up" not in (text := log.read_text()):
        assert process.poll() is None, f"worker process exited ({process.returncode}):\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"worker process not up in time:\n{text[-3000:]}"
        await asyncio.sleep(0.1)


def send_studies(port: int) -> list[str]:
    """``STUDIES`` studies of ``IMAGES_PER_STUDY`` CT images each, over one association."""
    template = dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="SCALE_TEST")
    ae.add_requested_context(CTImageStorage, template.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBRIDGE")
    assert assoc.is_established
    studies = []
    try:
        for _ in range(STUDIES):
            study, series = generate_uid(), generate_uid()
            for _ in range(IMAGES_PER_STUDY):
                template.StudyInstanceUID, template.SeriesInstanceUID = study, series
                template.SOPInstanceUID = generate_uid()
                template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
                assert assoc.send_c_store(template).Status == 0x0000
            studies.append(study)
    finally:
        assoc.release()
    return studies


async def test_sigkilled_worker_process_partitions_move_and_each_study_gets_one_report(
    tmp_path: Path, postgres_url: str, kafka: str, imaging_weights: Path,
) -> None:
    assert set((await partition_counts(kafka)).values()) == {12}  # MEDBRIDGE_KAFKA_PARTITIONS' default
    settings = stack_settings(tmp_path, database_url=postgres_url, kafka_bootstrap_servers=kafka,
                              workers="reports", imaging_model=imaging_weights, study_quiet_seconds=0.5)
    runtime = Runtime(settings)  # the edges and the report writer
    await runtime.start()
    workers: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    try:
        for log in logs:
            workers.append(worker_process(settings.data_dir.resolve(), postgres_url, kafka, imaging_weights, log))
        for worker, log in zip(workers, logs, strict=True):
            await wait_until_up(worker, log)
        studies = await asyncio.to_thread(send_studies, runtime.dicom.port)  # type: ignore[union-attr]

        # the first result means both members are consuming: kill one while the rest is in flight
        await until(lambda: completed(runtime) >= 1, timeout=60)
        victim, survivor = workers
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        assert completed(runtime) < STUDIES, "all done before the kill: make the load larger"

        await until(lambda: len(reports_by_study(runtime)) == STUDIES, timeout=90)
        await asyncio.sleep(SESSION_TIMEOUT_MS / 1000)  # a late duplicate would land by now
        assert reports_by_study(runtime) == Counter({study: 1 for study in studies})
        assert completed(runtime) == STUDIES  # one result event per study, though two members ran
        assert survivor.poll() is None
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(30)
        await runtime.stop()


def completed(runtime: Runtime) -> int:
    """ImagingInferenceCompleted events the workers stored (each in its StudyReceived's transaction)."""
    with runtime.store.session() as s:
        return len(list(s.scalars(select(OutboxEntry.id).where(OutboxEntry.topic == TOPIC_IMAGING_COMPLETED))))


def reports_by_study(runtime: Runtime) -> Counter[str]:
    with runtime.store.session() as s:
        return Counter(uid for uid in s.scalars(select(AiResult.study_instance_uid).where(AiResult.kind == "imaging"))
                       if uid is not None)


async def until(predicate, timeout: float) -> None:  # noqa: ANN001 - Callable[[], bool]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)




async def test_inference_worker_runs_in_a_niced_process_that_is_restarted_and_stops_with_the_runtime(
    tmp_path: Path, imaging_weights: Path,
) -> None:
    """`make run`'s default: the imaging worker in a process of its own, at a lower priority than the edges."""
    settings = stack_settings(tmp_path, workers="imaging,reports", imaging_model=imaging_weights,
                              inference_processes=True, inference_nice=7)
    runtime = Runtime(settings)
    await runtime.start()
    try:
        processes = runtime.inference_processes
        assert processes is not None and "imaging_worker" not in runtime.workers
        first = processes.pid("imaging")
        assert first is not None and first != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, first) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
        assert runtime.health["imaging_worker"]()

        os.kill(first, signal.SIGKILL)
        await until(lambda: not runtime.health["imaging_worker"](), timeout=10)  # /health shows it down
        await until(lambda: processes.pid("imaging") != first and runtime.health["imaging_worker"](), timeout=120)
        second = processes.pid("imaging")
    finally:
        await runtime.stop()
    assert second is not None and not Path(f"/proc/{second}").exists()  # stopped with the runtime
