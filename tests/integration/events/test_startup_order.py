"""Start-up order: the DICOM receive journal is replayed before the study publisher runs, so a study a
crash interrupted is announced once, whole, not as revisions of what was replayed when."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete, update

from integration.app.runtime import Runtime
from integration.db.store import Store
from integration.db.tables import ChangeTracker, DicomInstance
from integration.dicom.ingest.instances import InstanceIngest
from integration.dicom.ingest.journal import ReceiveJournal
from schemas.events import TOPIC_STUDY_RECEIVED, StudyReceived
from tests.conftest import stack_settings
from tests.integration.dicom.test_journal import SYNTAX, ct_instances
from tests.integration.events.helpers import outbox, until


async def test_a_study_interrupted_by_a_crash_is_announced_once_with_every_instance(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, workers="", study_quiet_seconds=0.5, dicom_journal_bytes=1 << 20)
    settings.data_dir.mkdir(parents=True)
    store = Store(settings.effective_database_url)
    store.start()
    try:
        # three instances acknowledged, then the crash: two rows never reached the database (SQLite's WAL
        # on a power cut), the journal was not checkpointed; the study's last change was long ago
        ingest = InstanceIngest(store, settings.dicom_dir,
                                journal=ReceiveJournal(settings.dicom_dir / ".journal", 1 << 20))
        ingest.recover()
        sent = ct_instances(3)
        for sop_uid, data, part10 in sent:
            assert ingest.ingest_data_set(data, SYNTAX, part10, expected_sop_uid=sop_uid).status == 0x0000
        ingest.journal.close()  # type: ignore[union-attr]
        with store.session() as s:
            s.execute(delete(DicomInstance).where(DicomInstance.sop_instance_uid.in_([u for u, _, _ in sent[1:]])))
            s.execute(update(ChangeTracker).values(last_change_at=0.0))
    finally:
        store.stop()

    runtime = Runtime(settings)
    await runtime.start()
    try:
        await until(lambda: len(outbox(runtime.store, TOPIC_STUDY_RECEIVED)) >= 1, timeout=30)
        await until(lambda: runtime.store.outbox_backlog() == 0, timeout=10)
        announced = [StudyReceived.model_validate_json(r.payload) for r in outbox(runtime.store, TOPIC_STUDY_RECEIVED)]
    finally:
        await runtime.stop()
    assert [(e.revision, e.instance_count) for e in announced] == [(announced[0].revision, 3)]
