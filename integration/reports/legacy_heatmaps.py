"""Upgrade of AI results written before heatmaps were artifacts: their details name a file (``heatmap_path``).

Versions before ImagingInferenceCompleted schema 2 wrote each overlay to ``<data dir>/artifacts/heatmaps/`` and
kept its path. At start the runtime stores those files in the artifact store and names them by id, so the
API's heatmap route and the PACS export keep serving them (the DiagnosticReports embed theirs already).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from integration.db.artifacts import MAX_ARTIFACT_BYTES, put_artifact
from integration.db.store import Store
from integration.db.tables import AiResult

log = logging.getLogger(__name__)


def legacy_heatmap_folder(data_dir: Path) -> Path:
    """Where versions before artifacts wrote the overlays; the only folder a legacy path may name."""
    return data_dir / "artifacts" / "heatmaps"


def _stored_file(s: Session, path: str | None, folder: Path) -> str | None:
    """The artifact id of the PNG at ``path`` when it is a file inside ``folder`` (else None: a path
    elsewhere is never read, whatever put it there)."""
    if not path:
        return None
    file = Path(path).resolve()
    if not file.is_relative_to(folder) or not file.is_file() or file.stat().st_size > MAX_ARTIFACT_BYTES:
        return None
    return put_artifact(s, file.read_bytes(), "image/png")


def _adopted(s: Session, instance: dict[str, Any], folder: Path) -> dict[str, Any]:
    adopted = {k: v for k, v in instance.items() if k != "heatmap_path"}
    adopted["heatmap_artifact_id"] = instance.get("heatmap_artifact_id") or _stored_file(
        s, instance.get("heatmap_path"), folder)
    return adopted


def adopt_heatmap_files(store: Store, data_dir: Path) -> int:
    """Store the overlay files that earlier AI results name by path and name them by artifact id instead;
    the number of results upgraded (0 once done). A path outside the legacy folder, or a file that is gone,
    leaves the instance without a heatmap. Idempotent, and safe when several processes start at once."""
    folder = legacy_heatmap_folder(data_dir).resolve()
    upgraded = 0
    with store.session() as s:
        # the JSON as text: a cheap filter on both engines, so a store without legacy rows loads none
        rows = s.scalars(select(AiResult).where(cast(AiResult.details, Text).like('%"heatmap_path"%'))).all()
        for row in rows:
            instances = row.details.get("instances", [])
            if not any("heatmap_path" in i for i in instances):
                continue
            row.details = {**row.details, "instances": [_adopted(s, i, folder) for i in instances]}
            upgraded += 1
    if upgraded:
        log.info("%d AI result(s) now name their heatmaps by artifact id; %s is no longer used and may be "
                 "deleted", upgraded, folder)
    return upgraded
