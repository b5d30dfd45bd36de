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


class GroundedSentence(BaseModel):
    """One sentence of a drafted impression and whether the passages it cites support it.

    ``cited`` are the 1-based numbers of the passages given to the model that the sentence cites (numbers
    that pointed at no passage are already removed from ``text``). ``similarity`` is the best embedding
    cosine between the sentence and a cited passage (or one of its sentences); ``overlap`` the share of the
    sentence's content words found in the cited passages. ``reason`` says why it is unsupported ("" if not).
    """

    model_config = ConfigDict(frozen=True)

    text: str
    cited: list[int] = Field(default_factory=list)
    supported: bool
    similarity: float = 0.0
    overlap: float = 0.0
    reason: str = ""


class ImpressionGrounding(BaseModel):
    """What the grounding check did to a drafted impression and found in it."""

    model_config = ConfigDict(frozen=True)

    sentences: list[GroundedSentence] = Field(default_factory=list)
    citations_kept: int = Field(0, description="[n] numbers that point at a passage the model was given")
    citations_removed: int = Field(0, description="[n] numbers that pointed at no passage given, removed")
    truncated: bool = Field(False, description="the draft hit the token limit and its cut sentence was dropped")

    @property
    def supported_count(self) -> int:
        return sum(1 for s in self.sentences if s.supported)


# How a DiagnosticReport carries the grounding (docs/grounding.md): one complex extension per impression
# sentence (sub-extensions text, supported, cited*, similarity, overlap, reason) and one summary extension
# (citationsKept, citationsRemoved, truncated). R4 DiagnosticReport has no ``note``; extensions keep the
# marks machine-readable beside the human-readable ``conclusion``.
SENTENCE_SUPPORT_EXTENSION = "https://medbridge.invalid/fhir/StructureDefinition/impression-sentence-support"
GROUNDING_SUMMARY_EXTENSION = "https://medbridge.invalid/fhir/StructureDefinition/impression-grounding"
UNSUPPORTED_MARK = "not supported by the cited evidence"
