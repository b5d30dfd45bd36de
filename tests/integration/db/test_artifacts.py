"""The artifact store on SQLite and PostgreSQL: content-addressed, idempotent, bounded, and an id that is
not an artifact id selects nothing."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import func, select

from integration.db.artifacts import (
    MAX_ARTIFACT_BYTES,
    ArtifactNotFoundError,
    ArtifactRefusedError,
    get_artifact,
    put_artifact,
    stored_artifact_ids,
)
from integration.db.store import Store
from integration.db.tables import Artifact

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # not a decodable image: the store keeps bytes as given


def _rows(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Artifact)) or 0


def test_an_artifact_is_named_by_the_sha256_of_its_bytes_and_stored_once(store: Store) -> None:
    with store.session() as s:
        aid = put_artifact(s, PNG, "image/png")
    with store.session() as s:  # the same bytes again, even under another media type: the first row stays
        assert put_artifact(s, PNG, "application/octet-stream") == aid
    assert aid == hashlib.sha256(PNG).hexdigest()
    artifact = get_artifact(store, aid)
    assert (artifact.data, artifact.media_type, artifact.size) == (PNG, "image/png", len(PNG))
    assert _rows(store) == 1
    assert stored_artifact_ids(store, [aid, "0" * 64, "../" + aid]) == {aid}


def test_an_artifact_written_in_a_rolled_back_transaction_is_not_kept(store: Store) -> None:
    with pytest.raises(RuntimeError), store.session() as s:
        aid = put_artifact(s, PNG, "image/png")
        raise RuntimeError("the result this artifact belonged to failed")
    with pytest.raises(ArtifactNotFoundError):
        get_artifact(store, aid)


@pytest.mark.parametrize("value", ["0" * 64, "A" * 64, "a" * 63, "a" * 64 + "\n", "../../etc/passwd", "/etc/passwd",
                                   "a\x00b", ""])
def test_unknown_and_malformed_ids_are_not_found_with_what_an_id_is(store: Store, value: str) -> None:
    with pytest.raises(ArtifactNotFoundError, match="64 lowercase hex digits") as caught:
        get_artifact(store, value)
    # a well-formed id is named; anything else is not echoed back (it came from outside)
    assert ("0" * 64 if value == "0" * 64 else "<not an artifact id>") in str(caught.value)


def test_oversized_bytes_and_malformed_media_types_are_refused_with_what_to_do(store: Store) -> None:
    with pytest.raises(ArtifactRefusedError, match="exceeds the store's limit .* store a smaller rendering"), \
            store.session() as s:
        put_artifact(s, b"\0" * (MAX_ARTIFACT_BYTES + 1), "image/png")
    for media_type in ("", "png", "image/png; charset=x", "image/png\r\nX-Injected: 1", "image/"):
        with pytest.raises(ArtifactRefusedError, match="'type/subtype'"), store.session() as s:
            put_artifact(s, PNG, media_type)
    assert _rows(store) == 0
    with store.session() as s:  # exactly at the limit is accepted
        put_artifact(s, b"\0" * MAX_ARTIFACT_BYTES, "application/octet-stream")
    assert _rows(store) == 1
