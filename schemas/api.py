"""Shapes of the query API under /api (what the viewer and other clients see)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal, get_args

from pydantic import BaseModel, Field, field_validator, model_validator

from schemas.events import EvidencePassage

ReportKind = Literal["imaging", "clinical"]
ReviewAction = Literal["final", "amended", "entered-in-error"]
# why a reviewer rejects (entered-in-error) an AI report; "other" needs a comment saying what
RejectionReason = Literal["wrong-finding", "missed-finding", "poor-image-quality", "not-applicable", "other"]
REJECTION_REASONS: tuple[str, ...] = get_args(RejectionReason)
# where an explanation map asked for on demand stands (integration.reports.explanations)
ExplanationState = Literal["pending", "ready", "failed"]


class ReportSummary(BaseModel):
    id: str
    kind: ReportKind
    status: str
    subject: str | None
    issued: datetime | None
    conclusion: str | None
    study_instance_uid: str | None = None
    top_finding: str | None = None
    top_probability: float | None = None


class InstanceResult(BaseModel):
    sop_instance_uid: str
    probabilities: dict[str, float]
    has_heatmap: bool
    heatmap_artifact_id: str | None = Field(None, description="the overlay PNG, at GET /api/artifacts/{id}")
    heatmap_layer_artifact_id: str | None = Field(
        None, description="the heatmap alone (8-bit grey PNG of its intensity at the image's geometry, to colour "
                          "and blend over a rendered frame), at GET /api/artifacts/{id}; absent on older results")
    explainable: bool | None = Field(
        None, description="whether its explanation map can be asked for (POST .../images/{sop}/explanation); "
                          "None on results from before this was recorded")
    explanation: ExplanationState | None = Field(None, description="where an explanation asked for stands")


class ExplanationStatus(BaseModel):
    """An explanation map asked for on demand: pending (the imaging worker renders it), ready (the artifacts
    named, and the report's instance names them too), or failed with the reason (asking again retries)."""

    report_id: str
    sop_instance_uid: str
    state: ExplanationState
    heatmap_artifact_id: str | None = Field(None, description="the overlay PNG, at GET /api/artifacts/{id}")
    heatmap_layer_artifact_id: str | None = Field(None, description="the heatmap alone, at GET /api/artifacts/{id}")
    reason: str | None = Field(None, description="why it failed")
    requested_at: datetime | None = None


class ReviewRecord(BaseModel):
    action: ReviewAction
    reviewer: str = Field(description="The reviewer's display name (from the authenticated identity)")
    reviewer_sub: str | None = Field(None, description="The authenticated subject (token sub) who decided")
    # a string: decisions recorded before the value set changed keep their older codes
    reason: str | None = None
    comment: str | None = None
    report_version: int | None = Field(None, description="The report version this decision made")
    at: datetime


class ReportDetail(ReportSummary):
    model_name: str | None = None
    model_version: str | None = None
    instances: list[InstanceResult] = Field(default_factory=list)
    evidence: list[EvidencePassage] = Field(default_factory=list)
    reviews: list[ReviewRecord] = Field(default_factory=list)
    input_refs: list[str] = Field(default_factory=list,
                                  description="the FHIR records a clinical model read (its patient context)")
    fhir: dict = Field(default_factory=dict, description="The DiagnosticReport as FHIR R4 JSON")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls but tab, LF, CR; and DEL


class ReviewRequest(BaseModel):
    """A reviewer's decision. Sent with ``If-Match: W/"<version>"`` of the report (see the review API)."""

    action: ReviewAction
    reason: RejectionReason | None = Field(
        None, description="Required when action is 'entered-in-error' (and only then); 'other' needs a comment")
    comment: str | None = Field(None, max_length=4000)
    conclusion: str | None = Field(None, max_length=8000, description="Required when action is 'amended'")
    # the reviewer is the authenticated caller, never a typed name: still accepted (older clients send it),
    # checked like the other text, and ignored
    reviewer: str | None = Field(None, min_length=1, max_length=200, deprecated=True,
                                 description="Ignored: the reviewer recorded is the authenticated caller")

    @model_validator(mode="after")
    def _reason_matches_action(self) -> ReviewRequest:
        if self.action == "entered-in-error" and self.reason is None:
            raise ValueError("a rejection (entered-in-error) needs a reason: one of " + ", ".join(REJECTION_REASONS))
        if self.action != "entered-in-error" and self.reason is not None:
            raise ValueError("reason is only for a rejection (entered-in-error); leave it out for " + self.action)
        if self.reason == "other" and not (self.comment and self.comment.strip()):
            raise ValueError("reason 'other' needs a comment saying what is wrong with the report")
        return self

    @field_validator("reviewer", "comment", "conclusion")
    @classmethod
    def _no_control_characters(cls, value: str | None) -> str | None:
        # PostgreSQL refuses NUL in text and JSON; none of these is a character a reviewer types
        if value is not None and (found := _CONTROL.search(value)):
            raise ValueError(f"holds the control character U+{ord(found.group()):04X}; send the text without it")
        return value


class DicomExportRecord(BaseModel):
    """One DICOM export of a report to one destination (no patient data): the preliminary SR and SC
    (``what`` issued) or the version a review made (``what`` reviewed, with its action)."""

    id: int
    report_id: str
    destination_ae: str
    what: Literal["issued", "reviewed"] = "issued"
    review_action: str | None = None
    state: Literal["pending", "sent", "dead"]
    attempts: int
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None


class DeliveryRecord(BaseModel):
    """One delivery of a report to one destination (no patient data: the payload is not shown).
    ``kind`` ehr: ``destination`` is the upstream FHIR base URL; pacs: the export peer's AE title."""

    id: int
    kind: Literal["ehr", "pacs"]
    destination: str
    report_id: str
    what: Literal["issued", "reviewed"]
    review_action: str | None
    state: Literal["pending", "sent", "dead"]
    attempts: int
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    delivered_as: str | None = Field(None, description="DiagnosticReport/<id> upstream; the SR's SOP Instance UID")
