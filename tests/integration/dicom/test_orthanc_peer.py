"""Orthanc (a third-party PACS) configured with MedBridge as a modality pushes a study to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select

from integration.db.store import Store
from integration.db.tables import OutboxEntry
from integration.dicom.network.listener import DicomListener
from integration.events.publisher import QuietPeriodPublisher, announce_study
from integration.fhir.storage import get_resource
from schemas.events import StudyReceived

# one real study of three CR series (pydicom's DICOMDIR test set), one image each
CR_STUDY = [get_testdata_file(f"dicomdirtests/77654033/{series}") for series in ("CR1/6154", "CR2/6247", "CR3/6278")]


def test_orthanc_pushes_a_multi_series_study_and_medbridge_announces_it_once(
    listener: DicomListener, store: Store, orthanc_factory: Any
) -> None:
    orthanc = orthanc_factory({"medbridge": ("MEDBRIDGE", "127.0.0.1", listener.port)})
    orthanc.start()
    headers = [dcmread(f, stop_before_pixels=True) for f in CR_STUDY]
    study_uid = headers[0].StudyInstanceUID
    assert {h.StudyInstanceUID for h in headers} == {study_uid}
    assert len({h.SeriesInstanceUID for h in headers}) == 3
    with orthanc.rest() as rest:
        study_ids = set()
        for path in CR_STUDY:
            r = rest.post("/instances", content=Path(path).read_bytes())
            assert r.status_code == 200, r.text
            study_ids.add(r.json()["ParentStudy"])
        assert len(study_ids) == 1
        # Orthanc sends the study to MedBridge over DICOM (C-STORE SCU), as a PACS would
        r = rest.post("/modalities/medbridge/store", json={"Resources": list(study_ids), "Synchronous": True})
        assert r.status_code == 200, r.text

    stored = store.study_instances(study_uid)
    assert sorted(i.sop_instance_uid for i in stored) == sorted(h.SOPInstanceUID for h in headers)
    assert {i.series_instance_uid for i in stored} == {h.SeriesInstanceUID for h in headers}
    for inst in stored:
        original = next(f for f, h in zip(CR_STUDY, headers, strict=True) if h.SOPInstanceUID == inst.sop_instance_uid)
        assert dcmread(inst.path).PixelData == dcmread(original).PixelData

    # the association's release makes the study due at once; it is announced exactly once
    publisher = QuietPeriodPublisher(store, "study", 60, announce_study)
    assert publisher.publish_due() == 1
    assert publisher.publish_due() == 0
    with store.session() as s:
        rows = [r for r in s.scalars(select(OutboxEntry)) if r.event_type == "StudyReceived"]
    assert len(rows) == 1
    event = StudyReceived.model_validate_json(rows[0].payload)
    assert event.study_instance_uid == study_uid and event.instance_count == 3
    imaging_study = get_resource(store, "ImagingStudy", event.imaging_study_ref.split("/")[1])
    assert len(imaging_study["series"]) == 3
