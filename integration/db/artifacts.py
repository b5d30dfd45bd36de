"""Artifacts by reference: derived files (heatmap overlays) kept by the store, named by their content.

An artifact's id is the sha256 of its bytes in lowercase hex. Events and stored AI results carry that id,
never a path: every worker shares the database (SQLite locally, PostgreSQL when scaled out), so a worker on
another host reads an artifact with the database URL alone, and an id taken from an event can only select
a row of the ``artifacts`` table, never name a file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import Artifact, utcnow
from integration.errors import MedBridgeError
from schemas.events import ARTIFACT_ID_PATTERN

# A heatmap overlay PNG at display size is a few hundred KB; anything near this is not a derived image
# but a mistake, and a row this size is read whole into memory by whoever serves it.
MAX_ARTIFACT_BYTES = 8 * 1024 * 1024
# type "/" subtype (RFC 6838 restricted names), no parameters: the value is served as Content-Type
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,62}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,62}")
_ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)  # with fullmatch: a trailing newline does not pass


class ArtifactError(MedBridgeError):
    """Base of the artifact store's errors."""


class ArtifactNotFoundError(ArtifactError):
    """No artifact has this id (or the id is not an artifact id at all)."""

    def __init__(self, artifact_id: str) -> None:
        shown = artifact_id if is_artifact_id(artifact_id) else "<not an artifact id>"
        super().__init__(f"artifact {shown} is not in the store; artifact ids come from the AI results "
                         "(GET /api/reports/{id}) and are the sha256 of the bytes, 64 lowercase hex digits")
        self.artifact_id = artifact_id


class ArtifactRefusedError(ArtifactError):
    """The bytes or media type cannot be stored as an artifact (too large, malformed media type)."""


def is_artifact_id(value: str) -> bool:
    """True when ``value`` has the form of an artifact id (64 lowercase hex digits, nothing else)."""
    return _ARTIFACT_ID.fullmatch(value) is not None


def artifact_id(data: bytes) -> str:
    """The id an artifact with these bytes has (or will have) in the store."""
    return hashlib.sha256(data).hexdigest()


def _check(data: bytes, media_type: str) -> None:
    if len(data) > MAX_ARTIFACT_BYTES:
        raise ArtifactRefusedError(
            f"an artifact of {len(data):,} bytes exceeds the store's limit of {MAX_ARTIFACT_BYTES:,} bytes; "
            "artifacts are derived images such as heatmap overlays: store a smaller rendering")
    if _MEDIA_TYPE.fullmatch(media_type) is None:
        raise ArtifactRefusedError("an artifact's media type must be 'type/subtype' without parameters, "
                                   "e.g. 'image/png'")


def put_artifact(s: Session, data: bytes, media_type: str) -> str:
    """Store ``data`` in the caller's transaction and return its id. Idempotent: the same bytes stored again,
    by this or a concurrent transaction, keep the first row (and its media type).

    Raises ArtifactRefusedError for bytes over MAX_ARTIFACT_BYTES or a malformed media type."""
    _check(data, media_type)
    aid = artifact_id(data)
    insert = postgresql_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
    s.execute(
        insert(Artifact)
        .values(id=aid, media_type=media_type, size=len(data), data=data, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["id"])
    )
    return aid


def get_artifact(store: Store, artifact_id: str) -> Artifact:
    """The stored artifact (``data``, ``media_type``, ``size``).

    Raises ArtifactNotFoundError when no artifact has this id; a value that is not an artifact id is
    refused the same way without asking the database."""
    if not is_artifact_id(artifact_id):
        raise ArtifactNotFoundError(artifact_id)
    with store.read_session() as s:
        row = s.get(Artifact, artifact_id)
    if row is None:
        raise ArtifactNotFoundError(artifact_id)
    return row


def stored_artifact_ids(store: Store, ids: Iterable[str]) -> set[str]:
    """Those of ``ids`` that name a stored artifact (values that are not artifact ids never do)."""
    wanted = {i for i in ids if is_artifact_id(i)}
    if not wanted:
        return set()
    with store.read_session() as s:
        return set(s.scalars(select(Artifact.id).where(Artifact.id.in_(wanted))))
