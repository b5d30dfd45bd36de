"""The one delivery queue on SQLite and PostgreSQL: leases, order per report, backoff, the dead list and
replay; and what a report and a review enqueue, in their own transaction."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from integration.db.store import Store
from integration.db.tables import DeliveryJob, Review
from integration.delivery import queue
from integration.delivery.plan import Destinations
from integration.identity import Actor
from integration.reports.writer import apply_review, write_report
from schemas.api import ReviewRequest
from schemas.events import ClinicalInferenceCompleted, ImagingInferenceCompleted, InstanceFinding

POLICY = queue.RetryPolicy(max_attempts=4, backoff_seconds=10, max_backoff_seconds=1000, lease_seconds=60)


def add(store: Store, kind: queue.Kind, destination: str, report_id: str, what: queue.What = "issued") -> int:
    with store.session() as s:
        job = queue.enqueue(s, kind, destination, report_id, what, {"n": 1})
        s.flush()
        return job.id


def test_a_claimed_job_is_leased_and_a_sender_whose_lease_ended_cannot_overwrite_the_next(store: Store) -> None:
    job_id = add(store, "pacs", "PACS", "r1")
    (first,) = queue.claim_due(store, "pacs", lease_seconds=60)
    assert first.id == job_id and first.payload == {"n": 1}
    assert queue.claim_due(store, "pacs", lease_seconds=60) == []  # leased: another sender skips it
    assert queue.claim_due(store, "ehr", lease_seconds=60) == []  # and a sender of the other kind never sees it
    with store.session() as s:  # the first sender hangs past its lease
        s.get(DeliveryJob, job_id).next_attempt_at = queue.utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
    (second,) = queue.claim_due(store, "pacs", lease_seconds=60)
    assert second.claim == first.claim + 1
    assert queue.record_success(store, first, "late") is False  # the stale claim changes nothing
    assert queue.record_failure(store, first, "late failure", POLICY) is None
    assert queue.record_success(store, second, "1.2.3") is True
    (row,) = queue.list_jobs(store, "pacs")
    assert (row.state, row.attempts, row.delivered_as, row.last_error) == ("sent", 1, "1.2.3", None)


def test_jobs_of_one_report_and_destination_go_in_order_and_others_do_not_wait(store: Store) -> None:
    issued = add(store, "ehr", "http://ehr-a", "r1")
    reviewed = add(store, "ehr", "http://ehr-a", "r1", "reviewed")
    other_report = add(store, "ehr", "http://ehr-a", "r2")
    other_upstream = add(store, "ehr", "http://ehr-b", "r1", "reviewed")
    claimed = queue.claim_due(store, "ehr", lease_seconds=60)
    assert [j.id for j in claimed] == [issued, other_report, other_upstream]  # the review waits for its report
    failed = queue.record_failure(store, claimed[0], "down", POLICY)
    assert failed is not None and failed.state == "pending"
    with store.session() as s:
        s.get(DeliveryJob, issued).next_attempt_at = queue.utcnow()  # type: ignore[union-attr]
    (retry,) = queue.claim_due(store, "ehr", lease_seconds=60)
    assert retry.id == issued  # still not the review
    dead = queue.record_failure(store, retry, "refused", POLICY, permanent=True)
    assert dead is not None and dead.state == "dead"
    assert queue.claim_due(store, "ehr", lease_seconds=60) == []  # a dead report holds back its review ...
    queue.replay(store, issued)
    (again,) = queue.claim_due(store, "ehr", lease_seconds=60)
    assert queue.record_success(store, again)
    assert [j.id for j in queue.claim_due(store, "ehr", lease_seconds=60)] == [reviewed]  # ... until it is sent


def test_failures_back_off_exponentially_then_die_and_a_replay_starts_afresh(store: Store) -> None:
    job_id = add(store, "pacs", "PACS", "r1")
    delays = []
    for attempt in range(1, 4):
        with store.session() as s:
            s.get(DeliveryJob, job_id).next_attempt_at = queue.utcnow()  # type: ignore[union-attr]
        (job,) = queue.claim_due(store, "pacs", lease_seconds=60)
        row = queue.record_failure(store, job, "PACS at 127.0.0.1:1 could not be reached", POLICY)
        assert row is not None and row.state == "pending" and row.attempts == attempt
        delays.append((row.next_attempt_at - row.updated_at) / timedelta(seconds=1))
        assert queue.claim_due(store, "pacs", lease_seconds=60) == []  # not due before its backoff ends
    for delay, base in zip(delays, (10, 20, 40), strict=True):  # doubled each time, +-25 % jitter
        assert 0.75 * base <= delay <= 1.25 * base
    assert POLICY.delay(30) == 1000  # capped
    with store.session() as s:
        s.get(DeliveryJob, job_id).next_attempt_at = queue.utcnow()  # type: ignore[union-attr]
    (job,) = queue.claim_due(store, "pacs", lease_seconds=60)
    dead = queue.record_failure(store, job, "still down", POLICY)
    assert dead is not None and (dead.state, dead.attempts) == ("dead", 4)
    assert queue.counts(store, "pacs") == {"pending": 0, "sent": 0, "dead": 1}
    assert queue.counts(store, "ehr") == {"pending": 0, "sent": 0, "dead": 0}
    with pytest.raises(queue.JobNotFoundError):
        queue.replay(store, job_id, "ehr")  # the EHR's replay route cannot touch a PACS job
    replayed = queue.replay(store, job_id, "pacs")
    assert (replayed.state, replayed.attempts, replayed.last_error) == ("pending", 0, None)
    with pytest.raises(queue.JobNotDeadError, match="is pending; only a dead delivery can be replayed"):
        queue.replay(store, job_id)
    assert [j.id for j in queue.claim_due(store, "pacs", lease_seconds=60)] == [job_id]


# what a report and a review enqueue ----------------------------------------------------------------
TARGETS = Destinations(ehr=("http://ehr-a/fhir", "http://ehr-b/fhir"), pacs=("PACS_A", "PACS_B"))


def imaging_event(findings: int = 1) -> ImagingInferenceCompleted:
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    return ImagingInferenceCompleted(
        source_event_id=str(uuid.uuid4()), study_instance_uid=study, revision=1, patient_ref=None,
        imaging_study_ref=None, model_name="demo", model_version="1",
        findings=[InstanceFinding(sop_instance_uid=f"{study}.{n}", series_instance_uid=f"{study}.0",
                                  probabilities={"synthetic_round_lesion": 0.7}) for n in range(findings)],
        skipped_instances=0 if findings else 1,
    )


def jobs(store: Store) -> list[tuple[str, str, str, str | None]]:
    return [(j.kind, j.destination, j.what, j.review_action) for j in queue.list_jobs(store)]


def test_a_report_enqueues_each_ehr_and_each_export_peer_once(store: Store) -> None:
    event = imaging_event()
    report_id = write_report(store, event, TARGETS)
    write_report(store, event, TARGETS)  # a redelivered result rewrites the report, adds no delivery
    assert jobs(store) == [("ehr", "http://ehr-a/fhir", "issued", None), ("ehr", "http://ehr-b/fhir", "issued", None),
                           ("pacs", "PACS_A", "issued", None), ("pacs", "PACS_B", "issued", None)]
    assert {j.report_id for j in queue.list_jobs(store)} == {report_id}
    (ehr, *_), pacs = queue.list_jobs(store, "ehr"), queue.list_jobs(store, "pacs")
    assert ehr.payload["resourceType"] == "Bundle" and all(j.payload == {} for j in pacs)  # no patient data


def test_reports_with_nothing_to_show_a_pacs_go_to_the_ehr_only(store: Store) -> None:
    write_report(store, imaging_event(findings=0), TARGETS)  # no image could be analysed
    clinical = ClinicalInferenceCompleted(source_event_id=str(uuid.uuid4()), patient_ref="Patient/p1", revision=1,
                                          model_name="llm", impression="Nothing acute.", evidence=[], input_refs=[])
    write_report(store, clinical, TARGETS)
    assert {(kind, what) for kind, _, what, _ in jobs(store)} == {("ehr", "issued")}
    assert len(jobs(store)) == 4


def test_a_review_enqueues_the_status_change_and_a_new_pacs_version_for_each_destination(store: Store) -> None:
    report_id = write_report(store, imaging_event(), TARGETS)
    apply_review(store, report_id, ReviewRequest(action="final"), Actor(sub="dr-a", name="Dr A"), 1, TARGETS)
    apply_review(store, report_id, ReviewRequest(action="amended", conclusion="No lesion."),
                 Actor(sub="dr-b", name="Dr B"), 2, TARGETS)
    reviewed = [j for j in queue.list_jobs(store) if j.what == "reviewed"]
    assert [(j.kind, j.destination, j.review_action) for j in reviewed] == [
        ("ehr", "http://ehr-a/fhir", "final"), ("ehr", "http://ehr-b/fhir", "final"),
        ("pacs", "PACS_A", "final"), ("pacs", "PACS_B", "final"),
        ("ehr", "http://ehr-a/fhir", "amended"), ("ehr", "http://ehr-b/fhir", "amended"),
        ("pacs", "PACS_A", "amended"), ("pacs", "PACS_B", "amended")]
    with store.session() as s:
        reviews = {r.id: r for r in s.query(Review).all()}
    assert {reviews[j.review_id].action for j in reviewed if j.review_id is not None} == {"final", "amended"}
    amended = next(r for r in reviews.values() if r.action == "amended")
    assert amended.conclusion == "No lesion."  # what the PACS version will say
    assert next(j for j in reviewed if j.review_action == "amended").payload["report"]["status"] == "amended"


def test_a_report_that_cannot_be_stored_queues_nothing(store: Store) -> None:
    """Report and deliveries are one transaction: a failure leaves neither behind."""
    if store.engine.dialect.name == "sqlite":
        with store.session() as s:
            s.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON ai_results BEGIN "
                           "SELECT RAISE(ABORT, 'refused'); END"))
    else:
        with store.session() as s:
            s.execute(text("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; "
                           "END $$ LANGUAGE plpgsql"))
            s.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON ai_results FOR EACH ROW EXECUTE FUNCTION refuse()"))
    with pytest.raises(Exception, match="refused"):  # noqa: B017, PT011 - the database's own error type
        write_report(store, imaging_event(), TARGETS)
    assert queue.list_jobs(store) == []


def test_a_database_from_before_the_delivery_queue_still_starts_and_takes_reviews(tmp_path: Path) -> None:
    """The older queues' tables stay (unused, their rows untouched); reviews gain their conclusion column."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript("""
            CREATE TABLE dicom_exports (id INTEGER PRIMARY KEY, report_id VARCHAR(64), destination_ae VARCHAR(16),
                                        state VARCHAR(8));
            INSERT INTO dicom_exports VALUES (1, 'old-report', 'PACS', 'dead');
            CREATE TABLE upstream_writebacks (id INTEGER PRIMARY KEY, upstream VARCHAR(512), report_id VARCHAR(64),
                                              kind VARCHAR(16), payload JSON, state VARCHAR(16));
            CREATE TABLE reviews (id INTEGER PRIMARY KEY, report_id VARCHAR(64), action VARCHAR(32),
                                  reviewer VARCHAR(200), comment TEXT, at DATETIME);
        """)
    store = Store(f"sqlite:///{path}")
    store.start()
    try:
        report_id = write_report(store, imaging_event(), TARGETS)
        apply_review(store, report_id, ReviewRequest(action="amended", conclusion="None."),
                     Actor(sub="dr-a", name="Dr A"), 1, TARGETS)
        assert len(queue.list_jobs(store)) == 8
        with store.session() as s:
            assert s.query(Review).one().conclusion == "None."
            assert s.execute(text("SELECT state FROM dicom_exports")).scalars().all() == ["dead"]
    finally:
        store.stop()


def test_a_job_failing_for_less_than_its_retry_window_stays_pending_past_max_attempts(store: Store) -> None:
    """A destination down for hours (an EHR's maintenance window) delays a delivery; it does not kill it."""
    patient = queue.RetryPolicy(max_attempts=2, backoff_seconds=0, max_backoff_seconds=0, lease_seconds=60,
                                retry_for_seconds=3600)
    job_id = add(store, "ehr", "https://ehr.example/fhir", "r-window")
    for _ in range(5):  # more than max_attempts, all within the hour
        (job,) = queue.claim_due(store, "ehr", lease_seconds=60)
        assert queue.record_failure(store, job, "503 from the EHR", patient).state == "pending"
    with store.session() as s:  # the hour has passed
        s.get(DeliveryJob, job_id).created_at = queue.utcnow() - timedelta(seconds=3601)  # type: ignore[union-attr]
    (job,) = queue.claim_due(store, "ehr", lease_seconds=60)
    assert queue.record_failure(store, job, "503 from the EHR", patient).state == "dead"
