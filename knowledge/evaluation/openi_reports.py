"""The Open-i (Indiana University) chest X-ray reports shipped inside ``torchxrayvision`` as data.

``torchxrayvision/data/NLMCXR_reports.tgz`` holds 3,955 radiology reports as XML (FINDINGS, IMPRESSION,
MeSH major labels). The archive is read directly: importing torchxrayvision itself pulls in imaging
dependencies the evaluation does not need.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from pydantic import BaseModel, ConfigDict

REPORTS_ARCHIVE = "NLMCXR_reports.tgz"


class OpenIError(Exception):
    """The Open-i reports cannot be found or read."""


class OpenIReport(BaseModel):
    """One report: its Open-i number, findings and impression text, and its MeSH major labels."""

    model_config = ConfigDict(frozen=True)

    report_id: int
    findings: str
    impression: str
    mesh: tuple[str, ...]


def reports_archive() -> Path:
    """Path of the archive inside the installed ``torchxrayvision`` package.

    Raises:
        OpenIError: the package (or its data file) is not installed.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "data" / REPORTS_ARCHIVE
        if path.is_file():
            return path
    raise OpenIError(f"the Open-i reports ({REPORTS_ARCHIVE}) were not found: install `torchxrayvision`")


def _clean(text: str | None) -> str:
    # "XXXX" is Open-i's de-identification mask; it carries nothing a model could use.
    return " ".join(re.sub(r"\bX{2,}\b", " ", text or "").split())


def load_reports(archive: Path | None = None) -> tuple[OpenIReport, ...]:
    """Every report with both findings and an impression, ordered by report number (a fixed order)."""
    return _load(archive or reports_archive())


@functools.lru_cache(maxsize=2)  # parsing 3,955 XML files takes seconds; the archive never changes
def _load(archive: Path) -> tuple[OpenIReport, ...]:
    out: list[OpenIReport] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                root = ET.fromstring(handle.read())
                sections = {a.get("Label"): _clean(a.text) for a in root.iter("AbstractText")}
                findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
                if not findings or not impression:
                    continue
                mesh = tuple(m.text.strip() for m in root.iter("major") if m.text and m.text.strip())
                out.append(OpenIReport(report_id=int(Path(member.name).stem), findings=findings,
                                       impression=impression, mesh=mesh))
    except (OSError, tarfile.TarError, ET.ParseError) as exc:
        raise OpenIError(f"cannot read the Open-i reports: {exc}") from exc
    return tuple(sorted(out, key=lambda r: r.report_id))
