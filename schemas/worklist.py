"""Shapes of the reviewer's workstation API: the worklist, claims, quality metrics and feedback."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from schemas.api import ReportKind

WorklistSort = Literal["probability", "priority", "waiting"]


class Claim(BaseModel):
    """A reviewer working on a report: others see it as in review by them until ``until``."""

    report_id: str
    reviewer: str = Field(description="the claiming reviewer's display name")
    reviewer_sub: str
    mine: bool = Field(description="whether the caller holds it")
    until: datetime


class StudyReport(BaseModel):
    """One report (revision) of a worklist entry's study."""

    id: str
    status: str
    issued: datetime


class WorklistItem(BaseModel):
    """One study (or, for a clinical report, one patient's record): its newest report stands for it, with
    the study's highest probability and every report of the study in ``reports``."""

    report_id: str = Field(description="the study's newest report")
    kind: ReportKind
    status: str
    study_instance_uid: str | None
    subject: str | None
    patient_id: str | None
    modality: str | None
    model_name: str | None
    model_version: str | None
    top_finding: str | None
    top_probability: float | None
    priority: str | None = Field(description="the ordering ServiceRequest's priority, when one is known")
    issued: datetime
    waiting_seconds: float
    instances: int
    claim: Claim | None = None
    reports: list[StudyReport]


class WorklistPage(BaseModel):
    items: list[WorklistItem]
    total: int = Field(description="entries matching the filters (every page)")
    counts: dict[str, int] = Field(description="entries per status, under every filter but status")
    offset: int
    limit: int


class QualityRates(BaseModel):
    decisions: int
    approved: int
    amended: int
    rejected: int
    acceptance_rate: float | None
    amendment_rate: float | None
    rejection_rate: float | None


class QualityGroup(QualityRates):
    key: str


class QualityReport(BaseModel):
    """Sign-off metrics over the decisions made in [``from_``, ``to``)."""

    from_: datetime | None = Field(None, alias="from")
    to: datetime | None
    time_to_sign_p50_seconds: float | None = Field(description="report issued to its first decision")
    time_to_sign_p90_seconds: float | None
    overall: QualityRates
    rejection_reasons: dict[str, int]
    by_model: list[QualityGroup]
    by_modality: list[QualityGroup]

    model_config = {"populate_by_name": True}
