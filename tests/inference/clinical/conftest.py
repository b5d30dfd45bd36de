"""Fixtures for the clinical operator: a small real knowledge base and a tiny real Llama."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from knowledge.generation.transformers_backend import TransformersGenerator, load_text_generator  # noqa: E402
from knowledge.ingest import icd10cm_passages, note_passages  # noqa: E402
from knowledge.store import KnowledgeBase  # noqa: E402
from knowledge.testing import build_tiny_random_llama  # noqa: E402
from schemas.clinical import CodedItem, ObservationItem, PatientContext  # noqa: E402


@pytest.fixture(scope="session")
def small_kb(tmp_path_factory: pytest.TempPathFactory) -> KnowledgeBase:
    """The project's notes plus the diabetes, kidney and lung-imaging ICD-10-CM leaves (fast to embed)."""
    kb = KnowledgeBase(tmp_path_factory.mktemp("kb-small"))
    kb.add([*note_passages(), *icd10cm_passages(["E11", "N18", "R91"], include_categories=False)])
    return kb


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_random_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def tiny_llm(tiny_llm_path: Path, tmp_path: Path) -> TransformersGenerator:
    return load_text_generator(tiny_llm_path, tmp_path, device="cpu")


@pytest.fixture(scope="session")
def llm_cache_dir() -> Path:
    path = Path(os.environ.get("MEDBRIDGE_TEST_CACHE", "/tmp/medbridge-test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def diabetes_ctx() -> PatientContext:
    return PatientContext(
        patient_ref="Patient/pt-0042",
        age_years=58,
        sex="female",
        conditions=[
            CodedItem(
                display="Type 2 diabetes mellitus without complications",
                code="E11.9",
                system="http://hl7.org/fhir/sid/icd-10-cm",
                ref="Condition/c-1",
            )
        ],
        observations=[
            ObservationItem(
                display="Hemoglobin A1c",
                value="8.2",
                unit="%",
                effective="2025-03-14",
                interpretation="high",
                ref="Observation/o-7",
            )
        ],
        medications=[CodedItem(display="metformin 500 mg tablet", ref="MedicationRequest/m-3")],
    )
