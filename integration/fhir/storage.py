"""FHIR resources in the store: versioned writes that keep the search index in the same transaction,
reads of current and past versions, and the one-time upgrade of a store from before the index.

The database layer (integration.db) knows the tables; this module knows what a FHIR resource is, so the
search index is maintained here, where every write of a resource passes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any, cast

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    String,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import FhirResource, FhirResourceVersion, FhirSearchIndex, utcnow
from integration.errors import ResourceGoneError, ResourceNotFoundError, VersionConflictError
from integration.fhir.search import INDEX_COLUMNS, backfill_version_times, index_rows, index_tuples, reindex_if_empty


def prepare(store: Store) -> None:
    """Bring a started store's FHIR data up to this version: version timestamps of rows written before the
    column existed, and the search index of resources stored before it existed (each a no-op once done).
    The composition root calls it after ``Store.start``."""
    with store.exclusive("fhir-prepare"):  # every process calls it at start; one does the work
        backfill_version_times(store)
        reindex_if_empty(store)


def _advisory_key(key: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for ``key``."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def json_text(content: dict[str, Any]) -> str:
    """FHIR JSON as text: compact UTF-8, as stored in a ``content`` column (read back by the JSON columns'
    json.loads) and sent in responses. orjson writes it 6x faster than json.dumps; integers beyond 64
    bits, which orjson refuses (a FHIR decimal may be one), go through json.dumps."""
    try:
        return orjson.dumps(content).decode()
    except TypeError:
        return json.dumps(content, separators=(",", ":"))


# PostgreSQL types of the FHIR tables' columns, for binary COPY: varchar and json (already serialised by
# json_text) go as text, whose binary form is the same UTF-8 bytes the server reads for both
_COPY_TYPES: dict[type, str] = {String: "text", Integer: "int4", BigInteger: "int8", DateTime: "timestamptz",
                                Boolean: "bool", JSON: "text"}


def _bulk_insert(conn: Connection, table: Table, names: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """INSERT ``rows`` (tuples of the ``names`` columns' values; JSON columns already serialised by
    ``json_text``) in the connection's transaction: COPY on PostgreSQL (one round trip instead of one per
    row), a plain DB-API executemany on SQLite. The column types' own bind processors convert the other
    values, as SQLAlchemy would, without its per-row bookkeeping (most of the write cost of a Bundle)."""
    dialect = conn.dialect
    columns = [table.c[n] for n in names]
    quoted = ", ".join(dialect.identifier_preparer.quote(n) for n in names)
    if dialect.name == "postgresql":
        # binary COPY: psycopg packs the values as the server stores them, nothing to parse on either side
        types = [_COPY_TYPES[type(c.type)] for c in columns]
        with conn.connection.driver_connection.cursor() as cur:  # type: ignore[union-attr]
            with cur.copy(f"COPY {table.name} ({quoted}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(types)
                for row in rows:
                    copy.write_row(row)
        return
    convert = [(i, p) for i, c in enumerate(columns) if not isinstance(c.type, JSON)
               and (p := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None]
    if convert:
        # the same values recur (every row's timestamp, a bundle's dates): each is converted once
        memos: list[dict[Any, Any]] = [{} for _ in convert]
        converted = []
        for row in rows:
            values = list(row)
            for (i, p), memo in zip(convert, memos, strict=True):
                value = values[i]
                if value is not None:
                    done = memo.get(value)
                    if done is None:
                        done = memo[value] = p(value)
                    values[i] = done
            converted.append(tuple(values))
        rows = converted
    placeholders = ", ".join("?" for _ in names)
    conn.exec_driver_sql(f"INSERT INTO {table.name} ({quoted}) VALUES ({placeholders})", rows)


# PostgreSQL casts of the FHIR tables' columns, for rows sent as one JSON array (_inserts_in_flight)
_JSON_CASTS: dict[type, str] = {String: "text", Integer: "int", BigInteger: "bigint", DateTime: "timestamptz",
                                Boolean: "boolean", JSON: "json"}


@cache
def _json_insert_sql(table: Table, names: tuple[str, ...]) -> str:
    """INSERT of the rows in one jsonb array parameter (each row an array of the ``names`` columns' values)."""
    values = ", ".join(f"(r->>{i})::{_JSON_CASTS[type(table.c[n].type)]}" for i, n in enumerate(names))
    return (f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {values} "
            "FROM jsonb_array_elements(%s::jsonb) AS r")


@cache
def _can_pipeline(dialect: str, driver: str) -> bool:
    """Whether the connections pipeline (psycopg 3 built on libpq 14 or later), for ``_inserts_in_flight``."""
    if (dialect, driver) != ("postgresql", "psycopg"):
        return False
    import psycopg

    return psycopg.Pipeline.is_supported()


@contextmanager
def _inserts_in_flight(conn: Connection, batches: Sequence[tuple[Table, Sequence[str], list[tuple[Any, ...]]]]
                       ) -> Iterator[None]:
    """PostgreSQL: send the INSERTs of ``batches`` in a pipeline and run the block while the server works
    on them; the exit waits for them (and raises what they raised). COPY cannot be pipelined, so each
    table's rows go as one jsonb array (orjson writes it; the server reads it with the columns' casts).
    Nothing else may use the connection inside the block."""
    driver = conn.connection.driver_connection
    with driver.pipeline():  # type: ignore[union-attr]
        with driver.cursor() as cur:  # type: ignore[union-attr]
            for table, names, rows in batches:
                if rows:
                    cur.execute(_json_insert_sql(table, tuple(names)), (orjson.dumps(rows).decode(),))
            yield


_STATUS_LENGTH = 32  # FhirResource.status


def _status_column(resource: dict[str, Any]) -> str | None:
    """The ``status`` column of a resource: its own status code, when one that fits the column. The codes
    the status search reads all fit (their types' required bindings are enforced, see fhir_resources);
    a longer one (ResearchStudy has a 46-character code; other types' are not checked) stays in the
    content only, where PostgreSQL would refuse the row."""
    status = resource.get("status")
    return status if isinstance(status, str) and len(status) <= _STATUS_LENGTH else None


# the columns put_resources writes, in the order of its row tuples
_RESOURCE_COLUMNS = ("resource_type", "id", "version_id", "last_updated", "subject_ref", "status", "identifier",
                     "deleted", "content")
_VERSION_COLUMNS = ("resource_type", "id", "version_id", "deleted", "content", "last_updated")


def serialize_conditional(s: Session, keys: Iterable[str]) -> None:
    """Make the rest of ``s``'s transaction exclusive to it among the writers of the same conditional
    ``keys`` (``fhir_search.conditional_key``: a resource type and its criteria), until it ends. Call it
    before the conditional search: the search then sees what an earlier writer of the same criteria
    committed, and no other one can create a match between this search and this commit. Without it two
    conditional creates arriving together both find nothing and both create (FHIR's idempotent
    If-None-Exist, on which an EHR's second push of a patient relies, then makes duplicates).

    PostgreSQL: a transaction-scoped advisory lock per key (64 bits of its BLAKE2b hash), all taken in
    one statement, in ascending order so that two transactions with several keys cannot deadlock on
    them; it holds across processes, and a search after it, in its own statement under READ COMMITTED,
    reads what the previous holder committed. A hash collision only serialises two unrelated criteria.

    SQLite: the database's write lock, taken now (``BEGIN IMMEDIATE``), whatever the keys: pysqlite
    opens a transaction only at the first INSERT, so the search would otherwise run outside any
    transaction, before the lock that serialises writers. Holding the write lock from the search to
    the commit serialises every writer for that time, conditional or not, which SQLite does for the
    writes anyway; SQLite has no lock per key (a lock table's row would be written, hence the same
    write lock). Callers without conditional entries do not call this: their transactions keep
    taking the lock at their first write, and nothing is added to their path."""
    wanted = sorted({_advisory_key(k) for k in keys})
    if not wanted:
        return
    conn = s.connection()
    if conn.dialect.name == "postgresql":
        # unnest gives the (sorted) array's order, in which the locks are taken
        conn.execute(text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k"),
                     {"keys": wanted})
    elif not conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
        # in a transaction already, it has written: it holds the write lock (a deferred transaction
        # takes it at its first write) and a read in it sees every committed write
        conn.exec_driver_sql("BEGIN IMMEDIATE")

def put_resource(
    s: Session,
    resource: dict[str, Any],
    *,
    if_match: int | None = None,
    subject_ref: str | None = None,
    identifier: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """Create or update ``resource`` (which must carry resourceType and id) inside session ``s``.

    Sets meta.versionId/lastUpdated, keeps the previous version in the history table.
    Returns (stored content, created). Raises VersionConflictError when if_match is stale.
    The ``status`` column is the resource's own ``status`` code (the ``status`` search reads it).
    """
    status = _status_column(resource)
    rtype, rid = resource["resourceType"], resource["id"]
    current = s.get(FhirResource, (rtype, rid), with_for_update=True)
    if if_match is not None and (current is None or current.version_id != if_match):
        raise VersionConflictError(
            f"{rtype}/{rid} is at version {current.version_id if current else 'none'}, not {if_match}"
        )
    version = 1 if current is None else current.version_id + 1
    now = utcnow()
    content = dict(resource)
    meta = dict(content.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    content["meta"] = meta
    # imported here: fhir_search reads the models above, and every write must be indexed

    if current is not None:
        s.execute(delete(FhirSearchIndex).where(FhirSearchIndex.resource_type == rtype,
                                                FhirSearchIndex.resource_id == rid))
    rows = index_rows(content)
    if rows:
        s.execute(insert(FhirSearchIndex), rows)
    if current is None:
        s.add(
            FhirResource(
                resource_type=rtype,
                id=rid,
                version_id=version,
                last_updated=now,
                subject_ref=subject_ref,
                status=status,
                identifier=identifier,
                content=content,
            )
        )
    else:
        current.version_id = version
        current.last_updated = now
        current.subject_ref = subject_ref
        current.status = status
        current.identifier = identifier
        current.deleted = False
        current.content = content
    s.add(FhirResourceVersion(resource_type=rtype, id=rid, version_id=version, content=content,
                              last_updated=now))
    return content, current is None

def put_resources(
    s: Session, resources: Sequence[dict[str, Any]], subject_refs: Sequence[str | None],
    *, fresh: Sequence[bool] | None = None, meanwhile: Callable[[], None] | None = None,
) -> list[tuple[dict[str, Any], bool]]:
    """``put_resource`` for many resources in one go (a transaction Bundle): one locking SELECT,
    then multi-row INSERTs of resources, versions and index rows. Same result as calling
    ``put_resource`` for each (without If-Match); a resource listed twice falls back to that.
    ``fresh`` marks the resources whose ids the server has just assigned: none is stored, so the
    SELECT leaves them out.

    ``meanwhile`` (the Bundle's validation) runs before the writes are done, and whatever it raises
    leaves the caller's transaction to roll back: on PostgreSQL, while the server inserts the rows
    (they are sent first, in a pipeline); elsewhere, and where the driver cannot pipeline, once the
    rows are built but before anything is written (SQLite's inserts run on this thread, and its write
    lock should not be held for longer; a validation worker, integration.fhir.validation, has until
    then)."""

    keys = [(r["resourceType"], r["id"]) for r in resources]
    dialect = s.get_bind().dialect
    streamed = meanwhile is not None and _can_pipeline(dialect.name, dialect.driver)
    if not keys or len(set(keys)) != len(keys):
        if meanwhile is not None:
            meanwhile()
        return [put_resource(s, r, subject_ref=ref) for r, ref in zip(resources, subject_refs, strict=True)]
    by_type: dict[str, list[str]] = {}
    for (rtype, rid), new in zip(keys, fresh or [False] * len(keys), strict=True):
        if not new:
            by_type.setdefault(rtype, []).append(rid)
    # one locking SELECT for the whole bundle (a primary-key seek per type on both engines)
    current = {
        (row.resource_type, row.id): row
        for row in s.scalars(
            select(FhirResource)
            .where(or_(*(and_(FhirResource.resource_type == rtype, FhirResource.id.in_(ids))
                         for rtype, ids in by_type.items())))
            .with_for_update()
        )
    } if by_type else {}
    now = utcnow()
    stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    new_rows: list[tuple[Any, ...]] = []
    versions: list[tuple[Any, ...]] = []
    index: list[tuple[Any, ...]] = []
    out = []
    for resource, subject_ref in zip(resources, subject_refs, strict=True):
        rtype, rid = resource["resourceType"], resource["id"]
        row = current.get((rtype, rid))
        version = 1 if row is None else row.version_id + 1
        content = {**resource, "meta": {**(resource.get("meta") or {}), "versionId": str(version),
                                        "lastUpdated": stamp}}
        status = _status_column(content)
        document = json_text(content)  # serialised once, for the current row and the history row
        if row is None:  # _RESOURCE_COLUMNS
            new_rows.append((rtype, rid, version, now, subject_ref, status, None, False, document))
        else:
            row.version_id, row.last_updated, row.content = version, now, content
            row.subject_ref, row.status, row.deleted = subject_ref, status, False
        versions.append((rtype, rid, version, False, document, now))  # _VERSION_COLUMNS
        index += index_tuples(content)
        out.append((content, row is None))
    if meanwhile is not None and not streamed:
        meanwhile()  # a refusal leaves nothing written: the SELECT above only read
        meanwhile = None
    for rtype, ids in by_type.items():
        stale = [i for i in ids if (rtype, i) in current]
        if stale:
            s.execute(delete(FhirSearchIndex).where(FhirSearchIndex.resource_type == rtype,
                                                    FhirSearchIndex.resource_id.in_(stale)))
    s.flush()  # the ORM updates above first; then the bulk writes (no per-row ORM or Core bookkeeping)
    conn = s.connection()
    batches = [(cast(Table, FhirResource.__table__), _RESOURCE_COLUMNS, new_rows),
               (cast(Table, FhirResourceVersion.__table__), _VERSION_COLUMNS, versions),
               (cast(Table, FhirSearchIndex.__table__), INDEX_COLUMNS, index)]
    if meanwhile is not None:
        with _inserts_in_flight(conn, batches):
            meanwhile()
        return out
    for table, names, rows in batches:
        if rows:
            _bulk_insert(conn, table, names, rows)
    return out

def delete_resource(s: Session, resource_type: str, resource_id: str) -> int | None:
    """Delete (a new, empty version marked deleted); returns that version, None if nothing was there."""
    current = s.get(FhirResource, (resource_type, resource_id), with_for_update=True)
    if current is None or current.deleted:
        return None
    now = utcnow()
    current.version_id += 1
    current.last_updated = now
    current.deleted = True
    stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    tomb = {
        "resourceType": resource_type,
        "id": resource_id,
        "meta": {"versionId": str(current.version_id), "lastUpdated": stamp},
    }
    current.content = tomb
    s.execute(delete(FhirSearchIndex).where(FhirSearchIndex.resource_type == resource_type,
                                            FhirSearchIndex.resource_id == resource_id))
    s.add(
        FhirResourceVersion(
            resource_type=resource_type, id=resource_id, version_id=current.version_id, deleted=True, content=tomb,
            last_updated=now,
        )
    )
    return current.version_id

def get_resource(store: Store, resource_type: str, resource_id: str) -> dict[str, Any]:
    with store.read_session() as s:
        row = s.get(FhirResource, (resource_type, resource_id))
        if row is None:
            raise ResourceNotFoundError(resource_type, resource_id)
        if row.deleted:
            raise ResourceGoneError(resource_type, resource_id)
        return row.content

def get_version(store: Store, resource_type: str, resource_id: str, version_id: int) -> dict[str, Any]:
    with store.read_session() as s:
        row = s.get(FhirResourceVersion, (resource_type, resource_id, version_id))
        if row is None:
            raise ResourceNotFoundError(resource_type, f"{resource_id}/_history/{version_id}")
        if row.deleted:
            raise ResourceGoneError(resource_type, f"{resource_id}/_history/{version_id}")
        return row.content

def history(store: Store, resource_type: str, resource_id: str) -> list[tuple[dict[str, Any], bool]]:
    """Every version, newest first, as (content, deleted)."""
    with store.read_session() as s:
        rows = list(
            s.scalars(
                select(FhirResourceVersion)
                .where(FhirResourceVersion.resource_type == resource_type, FhirResourceVersion.id == resource_id)
                .order_by(FhirResourceVersion.version_id.desc())
            )
        )
    if not rows:
        raise ResourceNotFoundError(resource_type, resource_id)
    return [(r.content, r.deleted) for r in rows]

def search_resources(store: Store,
    resource_type: str,
    *,
    ids: Sequence[str] | None = None,
    subject_ref: str | None = None,
    status: Sequence[str] | None = None,
    identifier: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Resources of a type matching every given criterion, newest first; also the total count."""
    q = select(FhirResource).where(FhirResource.resource_type == resource_type, FhirResource.deleted.is_(False))
    if ids:
        q = q.where(FhirResource.id.in_(list(ids)))
    if subject_ref:
        q = q.where(FhirResource.subject_ref == subject_ref)
    if status:
        q = q.where(FhirResource.status.in_(list(status)))
    if identifier:
        system, _, value = identifier.rpartition("|")
        matches = select(FhirSearchIndex.resource_id).where(
            FhirSearchIndex.resource_type == resource_type,
            FhirSearchIndex.param == "identifier",
            FhirSearchIndex.value == value,
        )
        if "|" in identifier:
            matches = matches.where(FhirSearchIndex.system == system)
        q = q.where(FhirResource.id.in_(matches))
    with store.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        page = s.scalars(q.order_by(FhirResource.last_updated.desc(), FhirResource.id).limit(limit).offset(offset))
        return [r.content for r in page], total
