"""Shapes of the query API under /api (what the viewer and other clients see)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from schemas.events import EvidencePassage

ReportKind = Literal["imaging", "clinical"]
ReviewAction = Literal["final", "amended", "entered-in-error"]


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


class ReviewRecord(BaseModel):
    action: ReviewAction
    reviewer: str
    comment: str | None = None
    at: datetime


class ReportDetail(ReportSummary):
    model_name: str | None = None
    model_version: str | None = None
    instances: list[InstanceResult] = Field(default_factory=list)
    evidence: list[EvidencePassage] = Field(default_factory=list)
    reviews: list[ReviewRecord] = Field(default_factory=list)
    fhir: dict = Field(default_factory=dict, description="The DiagnosticReport as FHIR R4 JSON")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls but tab, LF, CR; and DEL


class ReviewRequest(BaseModel):
    action: ReviewAction
    reviewer: str = Field(min_length=1, max_length=200)
    comment: str | None = Field(None, max_length=4000)
    conclusion: str | None = Field(None, max_length=8000, description="Required when action is 'amended'")

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
