"""The imaging worker with several studies in flight sharing forwards, over the real broker and PostgreSQL: studies
announced at once are each reported once with the results of serial processing; a forward that fails fails the
events of its batch (retried, then dead-lettered) without hanging, and the events after them still flow."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from inference.imaging.bundle import load_bundle
from inference.imaging.operator import BundleOperator
from inference.imaging.registry import ModelRegistry, RoutingRule
from inference.imaging.worker import ImagingWorker, infer_study
from integration.db.store import Store
from integration.db.tables import DicomInstance, OutboxEntry, utcnow
from integration.events.consumer import ConsumerOptions
from integration.events.relay import OutboxRelay
from schemas.events import TOPIC_STUDY_RECEIVED, ImagingInferenceCompleted, StudyReceived
from tests.conftest import stack_settings
from tests.integration.events.helpers import until


class FailingSwitch:
    """The network's forward raises while ``on`` is set (a GPU that fell over, a driver error)."""

    def __init__(self) -> None:
        self.on = threading.Event()

    def __call__(self, _module: torch.nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
        if self.on.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")


@pytest.fixture(scope="module")
def failing(trained_model: tuple[Path, dict[str, Any]]) -> Iterator[tuple[ModelRegistry, FailingSwitch]]:
    """The demo bundle loaded afresh for every series, its forward failing at the flip of a switch."""
    op = BundleOperator(load_bundle(trained_model[0], "cpu"))
    switch = FailingSwitch()
    handle = op.bundle.network.register_forward_pre_hook(switch)
    yield ModelRegistry([(op, RoutingRule())]), switch
    handle.remove()


@pytest.fixture
def store(postgres_store: Store) -> Store:
    """PostgreSQL: the engine concurrent workers share in production."""
    return postgres_store


# the C-FIND columns the listener fills from the header: left empty here
_NO_QUERY_COLUMNS = {column.key: None for column in DicomInstance.__table__.columns}


def _announce(store: Store, folder: Path, images: list[int]) -> list[StudyReceived]:
    """A study per entry of ``images`` with that many CT images (pydicom's CT_small, each image's pixels shifted
    differently), recorded as the DICOM listener records them, and their StudyReceived events in the outbox."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = base.pixel_array
    rows, events = [], []
    for study_no, count in enumerate(images):
        study, series = generate_uid(), generate_uid()
        for i in range(count):
            ds = base.copy()
            ds.PixelData = np.roll(pixels, 7 * study_no + 3 * i, axis=1).astype(pixels.dtype).tobytes()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path)
            rows.append({**_NO_QUERY_COLUMNS, "sop_instance_uid": ds.SOPInstanceUID, "study_instance_uid": study,
                         "series_instance_uid": ds.SeriesInstanceUID, "sop_class_uid": ds.SOPClassUID,
                         "transfer_syntax_uid": ds.file_meta.TransferSyntaxUID, "modality": ds.Modality,
                         "patient_id": None, "is_image": True, "path": str(path), "size": path.stat().st_size,
                         "received_at": utcnow()})
        events.append(StudyReceived(study_instance_uid=study, revision=1, instance_count=count))
    store.add_instances(rows)
    with store.session() as s:
        for event in events:
            Store.add_to_outbox(s, TOPIC_STUDY_RECEIVED, event, key=event.study_instance_uid)
    return events


def _results(store: Store) -> list[ImagingInferenceCompleted]:
    with store.session() as s:
        rows = s.scalars(select(OutboxEntry.payload).where(OutboxEntry.event_type == "ImagingInferenceCompleted"))
        return [ImagingInferenceCompleted.model_validate_json(payload) for payload in rows]


def _worker(store: Store, registry: ModelRegistry, tmp_path: Path, kafka: str, relay: OutboxRelay) -> ImagingWorker:
    settings = stack_settings(tmp_path, imaging_concurrency=4, imaging_explain_top=1)
    options = ConsumerOptions(bootstrap=kafka, group_prefix="xbatch", max_attempts=2, notify_outbox=relay.wake,
                              retry_base_seconds=0.05, retry_cap_seconds=0.2)
    return ImagingWorker(store, settings, options, registry=registry)


async def test_studies_announced_at_once_are_each_reported_once_with_the_results_of_serial_processing(
    kafka: str, store: Store, failing: tuple[ModelRegistry, FailingSwitch], tmp_path: Path
) -> None:
    registry, _ = failing
    events = _announce(store, tmp_path, [1, 2, 1, 3, 1])
    relay = OutboxRelay(store, kafka, poll_seconds=0.05)
    await relay.start()
    worker = _worker(store, registry, tmp_path, kafka, relay)
    await worker.start()
    try:
        await until(lambda: all(store.is_processed(worker.name, e.event_id) for e in events), timeout=60)
    finally:
        await worker.stop()
        await relay.stop()
    results = {r.source_event_id: r for r in _results(store)}
    assert len(_results(store)) == len(results) == len(events)  # each reported exactly once
    assert worker.batcher.forwards <= 8  # never more forwards than images
    for event in events:
        serial = infer_study(store, registry, event, explain_top=1)
        assert serial is not None
        shared = results[event.event_id]
        assert [f.sop_instance_uid for f in shared.findings] == [f.sop_instance_uid for f in serial.findings]
        for got, alone in zip(shared.findings, serial.findings, strict=True):
            assert list(got.probabilities) == list(alone.probabilities)
            assert torch.allclose(torch.tensor(list(got.probabilities.values())),
                                  torch.tensor(list(alone.probabilities.values())), atol=1e-5)
            assert got.heatmap_artifact_id == alone.heatmap_artifact_id  # the same top image explained


async def test_a_failing_shared_forward_dead_letters_its_events_without_hanging_and_the_next_ones_flow(
    kafka: str, store: Store, failing: tuple[ModelRegistry, FailingSwitch], tmp_path: Path
) -> None:
    registry, switch = failing
    relay = OutboxRelay(store, kafka, poll_seconds=0.05)
    await relay.start()
    worker = _worker(store, registry, tmp_path, kafka, relay)
    await worker.start()
    switch.on.set()
    try:
        doomed = _announce(store, tmp_path, [1, 2, 1])
        relay.wake()
        await until(lambda: len(store.dead_letters()) == len(doomed), timeout=60)
        switch.on.clear()
        letters = store.dead_letters()
        assert sorted(d.event_id for d in letters) == sorted(e.event_id for e in doomed)
        assert all("RuntimeError" in d.error and "illegal memory access" in d.error for d in letters)
        assert not any(store.is_processed(worker.name, e.event_id) for e in doomed)

        following = _announce(store, tmp_path, [1, 1])
        relay.wake()
        await until(lambda: all(store.is_processed(worker.name, e.event_id) for e in following), timeout=60)
    finally:
        switch.on.clear()
        await worker.stop()
        await relay.stop()
    assert sorted(r.source_event_id for r in _results(store)) == sorted(e.event_id for e in following)
    assert len(store.dead_letters()) == len(doomed)
