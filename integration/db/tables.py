"""Every table MedBridge keeps, in one leaf module: whoever starts the store creates them all, and no
module needs another one's import to see its tables (integration.db.store creates them, the rest of the
code reads and writes them)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMESPACE = uuid.UUID("6f1c2b52-6a43-4d59-9a53-1c5c7f7f5e11")


def stable_id(*parts: str) -> str:
    """A deterministic id for derived objects, so reprocessing an event rewrites rather than duplicates."""
    return str(uuid.uuid5(NAMESPACE, "|".join(parts)))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class DicomInstance(Base):
    __tablename__ = "dicom_instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    is_image: Mapped[bool] = mapped_column(Boolean)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the study revision whose StudyReceived first included the instance (None until announced): the
    # imaging worker infers on a revision's own instances, so a grown study's images are inferred once
    announced_revision: Mapped[int | None] = mapped_column(Integer, default=None)
    # Query index (C-FIND, QIDO-RS): filled by integration.dicom.query.index_fields at ingest
    patient_name: Mapped[str | None] = mapped_column(String(324), index=True, default=None)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8), default=None)
    patient_sex: Mapped[str | None] = mapped_column(String(16), default=None)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True, default=None)
    study_time: Mapped[str | None] = mapped_column(String(16), default=None)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    study_id: Mapped[str | None] = mapped_column(String(16), default=None)
    study_description: Mapped[str | None] = mapped_column(String(64), default=None)
    referring_physician_name: Mapped[str | None] = mapped_column(String(324), default=None)
    series_number: Mapped[int | None] = mapped_column(Integer, default=None)
    series_description: Mapped[str | None] = mapped_column(String(64), default=None)
    body_part_examined: Mapped[str | None] = mapped_column(String(16), default=None)
    instance_number: Mapped[int | None] = mapped_column(Integer, default=None)
    series_date: Mapped[str | None] = mapped_column(String(8), default=None)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, default=None)
    # DICOM JSON (PS3.18 F.2) of the non-bulk attributes (QIDO includefield, WADO-RS metadata), cached on first use
    dicom_json: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


# series-level queries and retrieves select by these too
Index("ix_dicom_instances_series_instance_uid", DicomInstance.series_instance_uid)
Index("ix_dicom_instances_patient_id", DicomInstance.patient_id)



class ChangeTracker(Base):
    """A study or a patient record that changed; published once it has been quiet long enough."""

    __tablename__ = "change_trackers"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    published_revision: Mapped[int] = mapped_column(Integer, default=0)
    last_change_at: Mapped[float] = mapped_column(Float, index=True)
    # when the first change since the last announcement arrived: a record that never goes quiet (a stream of
    # vitals) is still announced once it has waited the maximum (Settings.record_max_wait_seconds)
    pending_since: Mapped[float | None] = mapped_column(Float, default=None)
    # W3C trace context of what caused it (integration.observability.tracing); NULL when not tracing
    traceparent: Mapped[str | None] = mapped_column(String(64), default=None)


class FhirResource(Base):
    __tablename__ = "fhir_resources"
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    subject_ref: Mapped[str | None] = mapped_column(String(128), index=True)
    status: Mapped[str | None] = mapped_column(String(32), index=True)  # _STATUS_LENGTH
    # always NULL (identifiers are searched in fhir_search_index), so not indexed: its index only cost writes
    identifier: Mapped[str | None] = mapped_column(String(256))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    content: Mapped[dict[str, Any]] = mapped_column(JSON)


class FhirResourceVersion(Base):
    __tablename__ = "fhir_resource_versions"
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    content: Mapped[dict[str, Any]] = mapped_column(JSON)
    # when this version was written (type-level _history and _since); NULL in rows older than the column
    last_updated: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# _lastUpdated searches, the default sort and type-level _history read these without a full scan
Index("ix_fhir_resources_type_updated", FhirResource.resource_type, FhirResource.last_updated)
Index("ix_fhir_versions_type_updated", FhirResourceVersion.resource_type, FhirResourceVersion.last_updated)


class FhirSearchIndex(Base):
    """One row per indexed search-parameter value of a current resource (see integration.fhir.search).

    token: (system, value) with system '' when absent; reference: (target type, target id);
    string: value normalised (lower case, no accents); date: [date_start, date_end) in UTC.
    Written in the same transaction as the resource, replaced on update, removed on delete.
    """

    __tablename__ = "fhir_search_index"
    row_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                        autoincrement=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    param: Mapped[str] = mapped_column(String(64))
    system: Mapped[str | None] = mapped_column(String(256))
    value: Mapped[str | None] = mapped_column(String(256))
    date_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    date_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # partial indexes: a row carries a value or a date range, never both, so each row is written into
    # two indexes rather than four (a comparison on the column implies IS NOT NULL for both planners)
    __table_args__ = (
        # resource_id last: a search on one parameter finds, and counts, its resources in this index alone
        Index("ix_fhir_search_value_id", "resource_type", "param", "value", "system", "resource_id",
              sqlite_where=text("value IS NOT NULL"), postgresql_where=text("value IS NOT NULL")),
        Index("ix_fhir_search_date_start", "resource_type", "param", "date_start",
              sqlite_where=text("date_start IS NOT NULL"), postgresql_where=text("date_start IS NOT NULL")),
        Index("ix_fhir_search_date_end", "resource_type", "param", "date_end",
              sqlite_where=text("date_end IS NOT NULL"), postgresql_where=text("date_end IS NOT NULL")),
        Index("ix_fhir_search_resource", "resource_type", "resource_id", "param"),
    )


class OutboxEntry(Base):
    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    topic: Mapped[str] = mapped_column(String(128))
    key: Mapped[str | None] = mapped_column(String(256))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    # W3C trace context of what caused it (integration.observability.tracing); NULL when not tracing
    traceparent: Mapped[str | None] = mapped_column(String(64), default=None)


class ProcessedEvent(Base):
    __tablename__ = "processed_events"
    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AiResult(Base):
    """What the AI produced behind a DiagnosticReport: probabilities, evidence, heatmaps."""

    __tablename__ = "ai_results"
    report_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    source_event_id: Mapped[str] = mapped_column(String(64))
    subject_ref: Mapped[str | None] = mapped_column(String(128))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    reviewer: Mapped[str] = mapped_column(String(200))  # the authenticated reviewer's display name
    comment: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the conclusion an amendment set (the PACS's new SR version carries it); NULL for other actions
    conclusion: Mapped[str | None] = mapped_column(Text, default=None)
    # added 2026-12 (nullable: Store._add_missing_columns adds them to older databases, whose rows keep NULL)
    reviewer_sub: Mapped[str | None] = mapped_column(String(256))  # the authenticated subject (token sub)
    reason: Mapped[str | None] = mapped_column(String(32))  # why a rejection (schemas.api.RejectionReason)
    report_version: Mapped[int | None] = mapped_column(Integer)  # the report version the decision made


class WorklistEntry(Base):
    """What the reviewer's worklist filters and sorts on, one row per AI report (integration.reports.index
    fills it beside the report). ``study_key`` groups a study's revisions (the study UID; the patient for
    a clinical report); the ``latest`` row of a study stands for it and carries the study's aggregates
    (highest probability, images). The status is read live from the report (fhir_resources)."""

    __tablename__ = "worklist_entries"
    __table_args__ = (
        Index("ix_worklist_latest_issued", "latest", "issued_at"),
        Index("ix_worklist_latest_probability", "latest", "top_probability"),
        Index("ix_worklist_latest_priority", "latest", "priority", "issued_at"),
        Index("ix_worklist_study", "study_key"),
        Index("ix_worklist_filters", "latest", "kind", "modality", "model_name"),
        Index("ix_worklist_finding", "latest", "top_finding", "top_probability"),
        Index("ix_worklist_patient", "patient_ref"),
        Index("ix_worklist_patient_id", "patient_id"),
    )
    report_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_key: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    latest: Mapped[bool] = mapped_column(Boolean, default=True)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    modality: Mapped[str | None] = mapped_column(String(16), default=None)
    patient_ref: Mapped[str | None] = mapped_column(String(128), default=None)
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None)  # DICOM PatientID
    model_name: Mapped[str | None] = mapped_column(String(128), default=None)
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    top_finding: Mapped[str | None] = mapped_column(String(128), default=None)
    top_probability: Mapped[float | None] = mapped_column(Float, default=None)
    # 0 stat, 1 asap, 2 urgent, 3 routine (ServiceRequest.priority), 4 none known
    priority: Mapped[int] = mapped_column(Integer, default=4)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class ReviewClaim(Base):
    """A reviewer working on a report: others see "in review by <reviewer>" until ``expires_at``."""

    __tablename__ = "review_claims"
    report_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reviewer_sub: Mapped[str] = mapped_column(String(256))
    reviewer: Mapped[str] = mapped_column(String(200))  # display name
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    consumer: Mapped[str] = mapped_column(String(64))
    topic: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # set by POST /api/dead-letters/{id}/replay: a letter is replayed once (its event is then owed again)
    replayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    replayed_by: Mapped[str | None] = mapped_column(String(256), default=None)  # the admin's token subject


class DeliveryJob(Base):
    """One thing to deliver to one destination: an issued or reviewed report, to an EHR or a PACS.

    The report writer and the review add these rows in the same transaction as the change itself
    (integration.delivery.plan); one sender loop per ``kind`` drains them (integration.delivery.queue).
    ``kind`` 'ehr': ``destination`` is the upstream FHIR base URL and ``payload`` the FHIR content to
    send; 'pacs': ``destination`` is the export peer's AE title and ``payload`` is empty (the SR and SC
    are built at send time from the AI result and, for a review, the ``reviews`` row ``review_id``).
    Jobs of one (kind, destination, report) are sent in id order. No patient data beyond the EHR
    payload. The older ``dicom_exports`` and ``upstream_writebacks`` tables are no longer used.
    """

    __tablename__ = "delivery_jobs"
    __table_args__ = (
        Index("ix_delivery_jobs_due", "kind", "state", "next_attempt_at"),
        Index("ix_delivery_jobs_report", "kind", "destination", "report_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))  # ehr | pacs
    destination: Mapped[str] = mapped_column(String(512))
    report_id: Mapped[str] = mapped_column(String(64))
    what: Mapped[str] = mapped_column(String(16))  # issued | reviewed
    review_id: Mapped[int | None] = mapped_column(Integer, default=None)  # reviews.id, for 'reviewed'
    review_action: Mapped[str | None] = mapped_column(String(32), default=None)  # final | amended | entered-in-error
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(8), default="pending")  # pending | sent | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # when a pending job is due; while a sender holds it, when its lease ends
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claim: Mapped[int] = mapped_column(Integer, default=0)  # bumped by each sender that takes the job
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # what the destination calls the delivery: DiagnosticReport/<id> upstream, the SR's SOP Instance UID
    delivered_as: Mapped[str | None] = mapped_column(String(256), default=None)
    # W3C trace context of what caused it (integration.observability.tracing); NULL when not tracing
    traceparent: Mapped[str | None] = mapped_column(String(64), default=None)


class UpstreamReport(Base):
    """Where a MedBridge report lives upstream: its id, current version and its Observations."""

    __tablename__ = "upstream_reports"
    upstream: Mapped[str] = mapped_column(String(512), primary_key=True)
    report_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    upstream_id: Mapped[str] = mapped_column(String(128))
    version_id: Mapped[str | None] = mapped_column(String(128))
    result_refs: Mapped[list[str]] = mapped_column(JSON, default=list)
    # the fields MedBridge owns (integration.delivery.ehr.merge.OWNED) as it last sent them: on a 412, one the
    # EHR changed since is a conflict, never overwritten. NULL: sent before the column existed (not known)
    sent_fields: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Artifact(Base):
    """A derived file (a heatmap overlay PNG) kept in the database, named by the sha256 of its bytes.

    Events and AI results name artifacts by ``id``, never by a path, so a worker on another host reads
    them with the database URL alone (integration.db.artifacts writes and reads them)."""

    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of ``data``, lowercase hex
    media_type: Mapped[str] = mapped_column(String(127))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LocalUser(Base):
    """A person who logs in with a password in the embedded identity mode (``medbridge users add``)."""

    __tablename__ = "local_users"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    display_name: Mapped[str | None] = mapped_column(String(200))
    password_hash: Mapped[str] = mapped_column(String(256))  # argon2id, PHC string (integration.auth.users)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UpgradeProgress(Base):
    """How far a one-time data upgrade got (integration.fhir.storage.prepare's search reindex): written in
    the same transaction as each batch it upgrades, so a restart after a crash resumes after the last one."""

    __tablename__ = "upgrade_progress"
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[list[str] | None] = mapped_column(JSON, default=None)  # the last key done, task-defined
    done: Mapped[int] = mapped_column(Integer, default=0)  # items upgraded so far
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
