"""The clinical context the text worker reasons over: typed, minimal, free of direct identifiers.

Names, birth dates and identifiers never enter a prompt; age and sex do, because they matter clinically.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CodedItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    display: str
    code: str | None = None
    system: str | None = None
    ref: str | None = Field(None, description="FHIR reference of the source resource, e.g. 'Condition/1'")


class ObservationItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    display: str
    value: str | None = None
    unit: str | None = None
    effective: str | None = None
    interpretation: str | None = None
    ref: str | None = None


class PatientContext(BaseModel):
    model_config = ConfigDict(frozen=True)

    patient_ref: str
    age_years: int | None = None
    sex: str | None = None
    conditions: list[CodedItem] = Field(default_factory=list)
    observations: list[ObservationItem] = Field(default_factory=list)
    medications: list[CodedItem] = Field(default_factory=list)

    def has_clinical_content(self) -> bool:
        return bool(self.conditions or self.observations or self.medications)

    def input_refs(self) -> list[str]:
        items = [*self.conditions, *self.observations, *self.medications]
        return [i.ref for i in items if i.ref]
