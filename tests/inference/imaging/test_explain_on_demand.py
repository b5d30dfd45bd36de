"""The imaging worker renders an explanation map a reviewer asked for, over a real listener and store: the same
map the study's own run renders for its top images (the same bytes, so the same artifact ids), recorded against
the result; an image whose model the worker does not run fails with a reason instead."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from inference.imaging.registry import ModelRegistry
from inference.imaging.worker import explain_on_demand, infer_study
from integration.db.store import Store
from integration.dicom.network.listener import DicomListener
from integration.events.publisher import QuietPeriodPublisher, announce_study
from integration.reports.explanations import explanation_state, request_explanation
from integration.reports.writer import write_report
from schemas.events import ExplanationRequested
from tests.inference.imaging.test_imaging_worker import CT_SMALL, _announce_first, _announced, _copy_in_study, _send


def _asked(store: Store, report_id: str, sop: str) -> ExplanationRequested:
    status, asked = request_explanation(store, report_id, sop)
    assert asked and status.state == "pending"
    return ExplanationRequested(report_id=report_id, study_instance_uid="", series_instance_uid="",
                                sop_instance_uid=sop)


# SQLite alone: the rendering is the same on both engines, and the API's tests cover the record on PostgreSQL
pytestmark = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


def test_an_image_outside_the_top_gets_the_map_the_top_images_get_recorded_against_its_result(
    store: Store, listener: DicomListener, registry: ModelRegistry
) -> None:
    first = dcmread(CT_SMALL)
    _send(listener.port, first, _copy_in_study(first, first.SeriesInstanceUID))
    assert QuietPeriodPublisher(store, "study", 60, announce_study).publish_due() == 1
    (whole,) = _announced(store)
    result = infer_study(store, registry, whole, explain_top=1)
    assert result is not None and len(result.findings) == 2
    (bare,) = [f for f in result.findings if f.heatmap_artifact_id is None]
    assert bare.explainable is True
    report_id = write_report(store, result)

    record = explain_on_demand(store, registry, _asked(store, report_id, bare.sop_instance_uid))
    assert record.reason is None
    every = infer_study(store, registry, whole, explain_top=2)
    assert every is not None
    (reference,) = [f for f in every.findings if f.sop_instance_uid == bare.sop_instance_uid]
    assert (record.heatmap_artifact_id, record.heatmap_layer_artifact_id) == (
        reference.heatmap_artifact_id, reference.heatmap_layer_artifact_id)

    with store.session() as s:  # as the consumer stores the handler's outcome
        record.write(s)
    ready = explanation_state(store, report_id, bare.sop_instance_uid)
    assert (ready.state, ready.heatmap_artifact_id) == ("ready", reference.heatmap_artifact_id)
    # asked again (a redelivery): the recorded map, nothing rendered
    again = explain_on_demand(store, registry, ExplanationRequested(
        report_id=report_id, study_instance_uid="", series_instance_uid="", sop_instance_uid=bare.sop_instance_uid))
    assert again.heatmap_artifact_id == reference.heatmap_artifact_id


def test_an_image_whose_model_this_worker_does_not_run_fails_with_the_reason(
    store: Store, listener: DicomListener, registry: ModelRegistry
) -> None:
    _, first = _announce_first(store, listener)
    result = infer_study(store, registry, _announced(store)[0], explain_top=0)
    assert result is not None
    report_id = write_report(store, result.model_copy(update={"model_name": "another-model"}))
    record = explain_on_demand(store, registry, _asked(store, report_id, first.SOPInstanceUID))
    with store.session() as s:
        record.write(s)
    failed = explanation_state(store, report_id, first.SOPInstanceUID)
    assert failed.state == "failed" and "another-model" in (failed.reason or "")
