"""Events exchanged over Kafka.

Every event is a versioned, immutable pydantic model named in the past tense, carrying a
unique ``event_id`` that consumers use for idempotency (delivery is at least once).
Topic names live beside the events they carry.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.clinical import ImpressionGrounding

TOPIC_STUDY_RECEIVED = "medbridge.study.received.v1"
TOPIC_RECORD_RECEIVED = "medbridge.record.received.v1"
TOPIC_IMAGING_COMPLETED = "medbridge.imaging.completed.v1"
TOPIC_CLINICAL_COMPLETED = "medbridge.clinical.completed.v1"
TOPIC_REPORT_ISSUED = "medbridge.report.issued.v1"
TOPIC_DEAD_LETTER = "medbridge.deadletter.v1"
TOPIC_EXPLANATION_REQUESTED = "medbridge.explanation.requested.v1"

# The consumer that must record each topic's events as processed (the outbox republishes the rest)
IMAGING_WORKER = "imaging-worker"
CLINICAL_WORKER = "clinical-worker"
REPORT_WRITER = "report-writer"
CONSUMER_OF_TOPIC = {
    TOPIC_STUDY_RECEIVED: IMAGING_WORKER,
    TOPIC_RECORD_RECEIVED: CLINICAL_WORKER,
    TOPIC_IMAGING_COMPLETED: REPORT_WRITER,
    TOPIC_CLINICAL_COMPLETED: REPORT_WRITER,
    TOPIC_EXPLANATION_REQUESTED: IMAGING_WORKER,  # the models are loaded there, never in the API
}

# Topics published through the outbox that no consumer must process: the outbox publishes them once and
# never republishes them. ReportIssued is a notification for outside subscribers only: the PACS export and
# the EHR writeback a report owes are queued with the report itself (integration.delivery, in the report's
# transaction) and retried by the delivery senders, so nothing depends on ReportIssued being consumed
# (tests/integration/delivery/pacs/test_export_follows_the_report.py: a broker that loses it loses nothing).
NOTIFICATION_TOPICS = (TOPIC_REPORT_ISSUED,)

ALL_TOPICS = (
    TOPIC_STUDY_RECEIVED,
    TOPIC_RECORD_RECEIVED,
    TOPIC_IMAGING_COMPLETED,
    TOPIC_CLINICAL_COMPLETED,
    TOPIC_REPORT_ISSUED,
    TOPIC_DEAD_LETTER,
    TOPIC_EXPLANATION_REQUESTED,
)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return str(uuid.uuid4())


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(default_factory=_new_id)
    schema_version: Literal[1] = 1
    occurred_at: datetime = Field(default_factory=_now)


class StudyReceived(_Event):
    """A study (or a new revision of it, after more instances arrived) is complete enough to infer on."""

    event_type: Literal["StudyReceived"] = "StudyReceived"
    study_instance_uid: str
    revision: int
    patient_ref: str | None = Field(None, description="FHIR reference, e.g. 'Patient/abc'")
    imaging_study_ref: str | None = Field(None, description="FHIR reference to the ImagingStudy")
    instance_count: int


class RecordReceived(_Event):
    """A patient's clinical record changed and has been quiet for the configured period."""

    event_type: Literal["RecordReceived"] = "RecordReceived"
    patient_ref: str
    revision: int


# An artifact kept by the store (integration.db.artifacts) is named by the sha256 of its bytes, in lowercase
# hex: an id from an event can only ever select a stored artifact, never name a file.
ARTIFACT_ID_PATTERN = r"^[0-9a-f]{64}$"
ArtifactId = Annotated[str, Field(pattern=ARTIFACT_ID_PATTERN, description="sha256 of the artifact's bytes, hex")]


class InstanceFinding(BaseModel):
    # Extra fields are ignored, not refused: a version 1 event's ``heatmap_path`` (a file path) is dropped
    # unread, and its report is written without the heatmap.
    model_config = ConfigDict(frozen=True)

    sop_instance_uid: str
    series_instance_uid: str
    probabilities: dict[str, float]
    heatmap_artifact_id: ArtifactId | None = Field(None, description="the overlay PNG, in the artifact store")
    # Optional and additive, so no version bump: events written before it parse (no layer: the viewer shows the
    # overlay), and a reader that predates it ignores it (extra fields are ignored here).
    heatmap_layer_artifact_id: ArtifactId | None = Field(
        None, description="the heatmap alone: an 8-bit grey PNG of the Grad-CAM intensity at the image's geometry, "
                          "in the artifact store")
    # Optional and additive as the layer is: whether a model that scored this image can render its explanation map
    # on request (POST /api/reports/{id}/images/{sop}/explanation); None on results from before it (the worker decides).
    explainable: bool | None = None


class CodedConcept(BaseModel):
    """A code from a terminology (SNOMED CT for body structures), as DICOM and FHIR both name it."""

    model_config = ConfigDict(frozen=True)

    system: str = Field(description="the FHIR system URI, e.g. http://snomed.info/sct")
    code: str
    display: str


class SegmentMeasurement(BaseModel):
    """One segment of a segmentation: what it is and how large."""

    model_config = ConfigDict(frozen=True)

    segment_number: int = Field(ge=1, description="the segment's number in the DICOM SEG")
    label: str = Field(description="the model's name for the label, e.g. 'liver'")
    body_site: CodedConcept = Field(description="the segmented structure (the SEG's property type)")
    voxel_count: int = Field(ge=0)
    volume_ml: float = Field(ge=0, description="voxel count x voxel volume, in millilitres")


class SegmentationFinding(BaseModel):
    """A segmentation model's result on one series: the DICOM SEG (in the artifact store) and its segments."""

    model_config = ConfigDict(frozen=True)

    seg_artifact_id: ArtifactId = Field(description="the DICOM SEG (Part 10, application/dicom), in the store")
    series_instance_uid: str = Field(description="the SEG's own series")
    sop_instance_uid: str = Field(description="the SEG's own SOP Instance UID")
    source_series_instance_uid: str
    model_name: str
    model_version: str
    segments: list[SegmentMeasurement]


class ImagingInferenceCompleted(_Event):
    event_type: Literal["ImagingInferenceCompleted"] = "ImagingInferenceCompleted"
    # 2: findings name their heatmap by artifact id (1 named a file path). Version 1 events still parse,
    # so those waiting in the outbox at an upgrade still become reports (without their heatmap).
    schema_version: Literal[1, 2] = 2  # type: ignore[assignment]  # a field per event, not a method override
    source_event_id: str
    study_instance_uid: str
    revision: int
    patient_ref: str | None
    imaging_study_ref: str | None
    model_name: str
    model_version: str
    findings: list[InstanceFinding]
    skipped_instances: int = 0
    # image instances the detector could not decode: reported, so every image has one outcome
    skipped_sop_instance_uids: list[str] = Field(default_factory=list)
    # image instances of the study that earlier revisions' results covered (not inferred again)
    earlier_images: int = 0
    # segmentation models' results (DICOM SEG + volumes). Optional and additive: events without it still parse.
    segmentations: list[SegmentationFinding] = Field(default_factory=list)


class EvidencePassage(BaseModel):
    model_config = ConfigDict(frozen=True)

    passage_id: str
    source: str
    title: str
    text: str
    score: float
    cited: bool
    code: str | None = None


class ClinicalInferenceCompleted(_Event):
    event_type: Literal["ClinicalInferenceCompleted"] = "ClinicalInferenceCompleted"
    source_event_id: str
    patient_ref: str
    revision: int
    model_name: str
    impression: str
    evidence: list[EvidencePassage]
    input_refs: list[str] = Field(default_factory=list, description="FHIR references the impression used")
    conclusion_codes: list[tuple[str, str]] = Field(
        default_factory=list, description="ICD-10-CM (code, display) pairs supported by cited evidence"
    )
    grounding: ImpressionGrounding | None = Field(
        None, description="per-sentence support of the impression by its cited passages (None: not checked)"
    )


class ExplanationRequested(_Event):
    """A reviewer asked for the explanation map of one image of an imaging result that has none (the worker
    renders them only for the top images of a study). The imaging worker renders it and records it against
    the result (integration.reports.explanations); asking again while it is pending publishes nothing."""

    event_type: Literal["ExplanationRequested"] = "ExplanationRequested"
    report_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


class ReportIssued(_Event):
    event_type: Literal["ReportIssued"] = "ReportIssued"
    report_id: str
    source_event_id: str
    patient_ref: str | None


MedBridgeEvent = Annotated[
    StudyReceived | RecordReceived | ImagingInferenceCompleted | ClinicalInferenceCompleted | ReportIssued
    | ExplanationRequested,
    Field(discriminator="event_type"),
]

event_adapter: TypeAdapter[MedBridgeEvent] = TypeAdapter(MedBridgeEvent)


def parse_event(raw: bytes | str) -> MedBridgeEvent:
    """Parse a serialised event; raises ``pydantic.ValidationError`` for anything else."""
    return event_adapter.validate_json(raw)


# The base every event shares (event_id, schema_version): what consumers' handler registries are keyed by
AnyEvent = _Event

# The topic each event type travels on: a consumer subscribes to the topics of the types it handles
TOPIC_OF_EVENT: dict[type[AnyEvent], str] = {
    StudyReceived: TOPIC_STUDY_RECEIVED,
    RecordReceived: TOPIC_RECORD_RECEIVED,
    ImagingInferenceCompleted: TOPIC_IMAGING_COMPLETED,
    ClinicalInferenceCompleted: TOPIC_CLINICAL_COMPLETED,
    ReportIssued: TOPIC_REPORT_ISSUED,
    ExplanationRequested: TOPIC_EXPLANATION_REQUESTED,
}
