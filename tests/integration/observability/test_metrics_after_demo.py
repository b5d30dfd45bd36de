"""/metrics after a send-demo flow through the real runtime (a study over DICOM, a FHIR bundle, a review):
the families of the README's table, with their labels and non-zero counts, and no identifier as a label."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from integration.app.demo import demo_bundle, send_study
from schemas.events import (
    CLINICAL_WORKER,
    IMAGING_WORKER,
    TOPIC_IMAGING_COMPLETED,
    TOPIC_RECORD_RECEIVED,
    TOPIC_STUDY_RECEIVED,
)
from tests import authorized
from tests.test_end_to_end import base_url, wait_for

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def samples(text: str) -> dict[str, list[Sample]]:
    """Family name -> its samples, from Prometheus text."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(found: dict[str, list[Sample]], name: str, suffix: str = "", **labels: str) -> float:
    """The sum of ``name``'s samples (``name + suffix``) whose labels include ``labels``."""
    return sum(s.value for s in found[name] if s.name == name + suffix and labels.items() <= s.labels.items())


async def test_metrics_show_each_family_with_labels_and_counts_after_a_demo_flow(stack) -> None:  # noqa: ANN001
    study_uid, status = await asyncio.to_thread(send_study, "127.0.0.1", stack.dicom.port, "MEDBRIDGE")
    assert status == 0
    async with authorized.AsyncClient(base_url=base_url(stack), timeout=30) as client:
        posted = await client.post("/fhir", json=demo_bundle(), headers={"Content-Type": "application/fhir+json"})
        assert posted.status_code == 200, posted.text
        patient_ref = posted.json()["entry"][0]["response"]["location"].split("/_history")[0]
        imaging = await wait_for(client, "/fhir/ImagingStudy", {"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"})
        await wait_for(client, "/fhir/DiagnosticReport", {"subject": patient_ref}, timeout=120)
        (report, *_) = await wait_for(client, "/fhir/DiagnosticReport", {"subject": imaging[0]["subject"]["reference"]})
        version = {"If-Match": (await client.get(f"/api/reports/{report['id']}")).headers["ETag"]}
        signed = await client.post(f"/api/reports/{report['id']}/review", json={"action": "final"}, headers=version)
        assert signed.status_code == 200, signed.text
        text = (await client.get("/metrics")).text

    found = samples(text)
    # DICOM edge: the association by calling AE (not a configured peer: "other") and outcome, the instance
    # by SOP class and status, its bytes, the journal's syncs and fill
    assert value(found, "medbridge_dicom_associations", "_total", calling_ae="other", outcome="accepted") >= 1
    assert value(found, "medbridge_dicom_instances", "_total", sop_class=CT_IMAGE_STORAGE, status="0x0000") >= 1
    assert value(found, "medbridge_dicom_received_bytes", "_total") > 0
    assert value(found, "medbridge_dicom_journal_sync_seconds", "_count") >= 1
    assert "medbridge_dicom_journal_fill_ratio" in found
    # HTTP by route template, method and status; the latency histogram beside it
    assert value(found, "medbridge_http_requests", "_total", route="/fhir", method="POST", status="200") >= 1
    assert value(found, "medbridge_http_requests", "_total", route="/api/reports/{report_id}/review",
                 method="POST", status="200") >= 1
    assert value(found, "medbridge_http_request_duration_seconds", "_count", route="/fhir", method="POST") >= 1
    # events: published and consumed by topic, processing time, lag per group and partition
    for topic in (TOPIC_STUDY_RECEIVED, TOPIC_RECORD_RECEIVED, TOPIC_IMAGING_COMPLETED):
        assert value(found, "medbridge_events_published", "_total", topic=topic) >= 1, topic
    assert value(found, "medbridge_events_consumed", "_total", consumer=IMAGING_WORKER, topic=TOPIC_STUDY_RECEIVED,
                 outcome="processed") >= 1
    assert value(found, "medbridge_events_consumed", "_total", consumer=CLINICAL_WORKER,
                 topic=TOPIC_RECORD_RECEIVED, outcome="processed") >= 1
    assert value(found, "medbridge_event_processing_seconds", "_count", consumer=IMAGING_WORKER) >= 1
    lag = [s for s in found["medbridge_consumer_lag"] if s.labels["group"].endswith(IMAGING_WORKER)]
    assert lag and {"group", "topic", "partition"} == set(lag[0].labels) and lag[0].labels["partition"].isdigit()
    # inference per model, the review decision, the store's state read at scrape time
    models = {s.labels["model"] for s in found["medbridge_inference_seconds"] if s.name.endswith("_count")}
    assert len(models) >= 2, models  # the imaging CNN and the clinical LLM
    assert value(found, "medbridge_inference_batch_size", "_count") >= 2
    assert value(found, "medbridge_review_decisions", "_total", action="final") >= 1
    assert value(found, "medbridge_outbox_backlog") >= 0 and "medbridge_outbox_oldest_age_seconds" in found
    for family in ("medbridge_delivery_queue_depth", "medbridge_delivery_oldest_pending_age_seconds",
                   "medbridge_events_dead_lettered", "medbridge_event_retries", "medbridge_llm_tokens_per_second",
                   "medbridge_llm_time_to_first_token_seconds", "medbridge_writeback_pending",
                   "medbridge_dead_letters"):
        assert family in found, family
    # bounded labels: no UID, no patient reference, no raw path anywhere in a label
    labels = {v for family in found.values() for s in family for v in s.labels.values()}
    assert not any(study_uid in v or patient_ref.split("/")[1] in v or report["id"] in v for v in labels)
