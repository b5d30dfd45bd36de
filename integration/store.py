"""The durable store: the source of truth for everything MedBridge received or produced.

SQLAlchemy on SQLite by default, PostgreSQL when ``DATABASE_URL`` says so. Kafka only carries
notifications: every event is first written to the ``outbox`` table in the same transaction as
the state it announces, and the outbox relay publishes it (at least once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast

import orjson
from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from integration.errors import (
    ResourceGoneError,
    ResourceNotFoundError,
    StoreUnavailableError,
    VersionConflictError,
)
from integration.phi import uid_hash

NAMESPACE = uuid.UUID("6f1c2b52-6a43-4d59-9a53-1c5c7f7f5e11")


def stable_id(*parts: str) -> str:
    """A deterministic id for derived objects, so reprocessing an event rewrites rather than duplicates."""
    return str(uuid.uuid5(NAMESPACE, "|".join(parts)))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class DicomInstance(Base):
    __tablename__ = "dicom_instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    is_image: Mapped[bool] = mapped_column(Boolean)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the study revision whose StudyReceived first included the instance (None until announced): the
    # imaging worker infers on a revision's own instances, so a grown study's images are inferred once
    announced_revision: Mapped[int | None] = mapped_column(Integer, default=None)
    # Query index (C-FIND, QIDO-RS): filled by integration.dicom_query.index_fields at ingest
    patient_name: Mapped[str | None] = mapped_column(String(324), index=True, default=None)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8), default=None)
    patient_sex: Mapped[str | None] = mapped_column(String(16), default=None)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True, default=None)
    study_time: Mapped[str | None] = mapped_column(String(16), default=None)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    study_id: Mapped[str | None] = mapped_column(String(16), default=None)
    study_description: Mapped[str | None] = mapped_column(String(64), default=None)
    referring_physician_name: Mapped[str | None] = mapped_column(String(324), default=None)
    series_number: Mapped[int | None] = mapped_column(Integer, default=None)
    series_description: Mapped[str | None] = mapped_column(String(64), default=None)
    body_part_examined: Mapped[str | None] = mapped_column(String(16), default=None)
    instance_number: Mapped[int | None] = mapped_column(Integer, default=None)
    series_date: Mapped[str | None] = mapped_column(String(8), default=None)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, default=None)
    # DICOM JSON (PS3.18 F.2) of the non-bulk attributes (QIDO includefield, WADO-RS metadata), cached on first use
    dicom_json: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


# series-level queries and retrieves select by these too
Index("ix_dicom_instances_series_instance_uid", DicomInstance.series_instance_uid)
Index("ix_dicom_instances_patient_id", DicomInstance.patient_id)


# what an instance's row cannot do without; the rest are query columns, copies of values in its file
_INSTANCE_ESSENTIALS = frozenset({"sop_instance_uid", "study_instance_uid", "series_instance_uid", "sop_class_uid",
                                  "transfer_syntax_uid", "is_image", "path", "size", "received_at"})


def _without_query_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    query_columns = (c.key for c in DicomInstance.__table__.columns if c.key not in _INSTANCE_ESSENTIALS)
    return {**dict.fromkeys(query_columns), **{k: v for k, v in row.items() if k in _INSTANCE_ESSENTIALS}}


class ChangeTracker(Base):
    """A study or a patient record that changed; published once it has been quiet long enough."""

    __tablename__ = "change_trackers"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    published_revision: Mapped[int] = mapped_column(Integer, default=0)
    last_change_at: Mapped[float] = mapped_column(Float, index=True)


class FhirResource(Base):
    __tablename__ = "fhir_resources"
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    subject_ref: Mapped[str | None] = mapped_column(String(128), index=True)
    status: Mapped[str | None] = mapped_column(String(32), index=True)  # _STATUS_LENGTH
    # always NULL (identifiers are searched in fhir_search_index), so not indexed: its index only cost writes
    identifier: Mapped[str | None] = mapped_column(String(256))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    content: Mapped[dict[str, Any]] = mapped_column(JSON)


class FhirResourceVersion(Base):
    __tablename__ = "fhir_resource_versions"
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    content: Mapped[dict[str, Any]] = mapped_column(JSON)
    # when this version was written (type-level _history and _since); NULL in rows older than the column
    last_updated: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# _lastUpdated searches, the default sort and type-level _history read these without a full scan
Index("ix_fhir_resources_type_updated", FhirResource.resource_type, FhirResource.last_updated)
Index("ix_fhir_versions_type_updated", FhirResourceVersion.resource_type, FhirResourceVersion.last_updated)


class FhirSearchIndex(Base):
    """One row per indexed search-parameter value of a current resource (see integration.fhir_search).

    token: (system, value) with system '' when absent; reference: (target type, target id);
    string: value normalised (lower case, no accents); date: [date_start, date_end) in UTC.
    Written in the same transaction as the resource, replaced on update, removed on delete.
    """

    __tablename__ = "fhir_search_index"
    row_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                        autoincrement=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    param: Mapped[str] = mapped_column(String(64))
    system: Mapped[str | None] = mapped_column(String(256))
    value: Mapped[str | None] = mapped_column(String(256))
    date_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    date_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # partial indexes: a row carries a value or a date range, never both, so each row is written into
    # two indexes rather than four (a comparison on the column implies IS NOT NULL for both planners)
    __table_args__ = (
        # resource_id last: a search on one parameter finds, and counts, its resources in this index alone
        Index("ix_fhir_search_value_id", "resource_type", "param", "value", "system", "resource_id",
              sqlite_where=text("value IS NOT NULL"), postgresql_where=text("value IS NOT NULL")),
        Index("ix_fhir_search_date_start", "resource_type", "param", "date_start",
              sqlite_where=text("date_start IS NOT NULL"), postgresql_where=text("date_start IS NOT NULL")),
        Index("ix_fhir_search_date_end", "resource_type", "param", "date_end",
              sqlite_where=text("date_end IS NOT NULL"), postgresql_where=text("date_end IS NOT NULL")),
        Index("ix_fhir_search_resource", "resource_type", "resource_id", "param"),
    )


def _dialect_insert(dialect: str, table: Any) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (SQLite and PostgreSQL spell it alike)."""
    return postgresql_insert(table) if dialect == "postgresql" else sqlite_insert(table)


@cache
def _tracker_touch(dialect: str) -> Any:
    """The upsert that creates a change tracker at revision 1 or bumps its revision (``kind``, ``key``, ``now``)."""
    trackers = ChangeTracker.__table__
    return (
        _dialect_insert(dialect, trackers)
        .values(kind=bindparam("kind"), key=bindparam("key"), revision=1, published_revision=0,
                last_change_at=bindparam("now"))
        .on_conflict_do_update(
            index_elements=["kind", "key"],
            set_={"revision": trackers.c.revision + 1, "last_change_at": bindparam("now")},
        )
    )


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


class OutboxEntry(Base):
    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    topic: Mapped[str] = mapped_column(String(128))
    key: Mapped[str | None] = mapped_column(String(256))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)


class ProcessedEvent(Base):
    __tablename__ = "processed_events"
    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AiResult(Base):
    """What the AI produced behind a DiagnosticReport: probabilities, evidence, heatmaps."""

    __tablename__ = "ai_results"
    report_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    source_event_id: Mapped[str] = mapped_column(String(64))
    subject_ref: Mapped[str | None] = mapped_column(String(128))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    reviewer: Mapped[str] = mapped_column(String(200))
    comment: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    consumer: Mapped[str] = mapped_column(String(64))
    topic: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


log = logging.getLogger(__name__)

# SQLite's own automatic checkpoint, at this many WAL pages, is only a backstop: the store's checkpointer
# thread (_WalCheckpointer) checkpoints at _CHECKPOINT_PAGES, as SQLite would, but off the committing thread
_CHECKPOINT_PAGES = 1_000
_BUSY_TIMEOUT_MS = 30_000
_WAL_BACKSTOP_PAGES = 20_000


# A pooled PostgreSQL connection is pinged before use only when it has been idle this long: the server
# can drop an idle connection (or restart), and a ping is a round trip, one of five in a FHIR search.
# HikariCP skips its validation likewise for a connection used within the last 0.5 s (aliveBypassWindowMs).
PING_AFTER_IDLE_S = 0.5


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, except for connections back from use within PING_AFTER_IDLE_S (SQLAlchemy's
    custom pessimistic ping: a DisconnectionError in checkout makes the pool connect anew and retry)."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
            return  # just connected, or just used
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"a pooled connection was lost while idle: {exc}") from exc


@contextmanager
def _unavailable_as_store_error() -> Iterator[None]:
    """A session's OperationalError (the database unreachable, locked, out of space) as StoreUnavailableError."""
    try:
        yield
    except OperationalError as exc:
        raise StoreUnavailableError(f"database unavailable: {exc.orig}") from exc


def _enable_sqlite_wal(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL lets the DICOM threads write while the API reads; busy_timeout waits for the lock
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA wal_autocheckpoint={_WAL_BACKSTOP_PAGES}")
        cur.close()


def _wal_backlog(shm_fd: int) -> int | None:
    """WAL frames not yet copied into the database, read from the WAL-index header in the ``-shm`` file
    (https://www.sqlite.org/walformat.html: mxFrame at byte 16, nBackfill at byte 96, native byte order);
    None when it cannot be read."""
    try:
        header = os.pread(shm_fd, 100, 0)
    except OSError:
        return None
    if len(header) < 100:
        return None
    return int(struct.unpack_from("=I", header, 16)[0]) - int(struct.unpack_from("=I", header, 96)[0])


class _WalCheckpointer:
    """Checkpoints SQLite's WAL on its own thread, so that no commit waits for a checkpoint.

    SQLite's automatic checkpoint runs in the commit that takes the WAL past 1,000 pages: it copies them
    into the database and syncs both files, ~10 ms, in every third or fourth FHIR transaction Bundle (two
    thirds of their commit time). Here, after each transaction (the pool's check-in), this thread looks at
    the WAL's backlog and runs the same checkpoint (passive: it blocks neither readers nor the writer; the
    sqlite3 module releases the GIL meanwhile) when it reaches 1,000 pages. Finished before the next write
    transaction, it lets that one restart the WAL from its beginning, as before. A WAL that writes kept from
    restarting is restarted at _WAL_BACKSTOP_PAGES (briefly holding writers back). Durability is
    unchanged: with ``synchronous=NORMAL`` a commit is in the WAL before it returns, whoever checkpoints
    it later.
    """

    def __init__(self, engine: Engine, database: str) -> None:
        self._engine = engine
        self._shm = f"{database}-shm"
        self._due = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # The -shm file stays open until the engine's connections are closed (``release``): closing
        # any descriptor of a file drops every POSIX lock the process holds on it, SQLite's included
        # (https://www.sqlite.org/howtocorrupt.html, 2.2). Opened and closed per read, it let another
        # process restart the WAL under this one's connections: with two DICOM listener processes,
        # committed rows vanished.
        self._shm_fd = -1
        event.listen(engine, "checkin", lambda *_: self._due.set())

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping.set()
            self._due.set()
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        """Close the -shm file; only once the engine's connections are closed (see ``__init__``)."""
        if self._shm_fd >= 0:
            os.close(self._shm_fd)
            self._shm_fd = -1

    def _run(self) -> None:
        try:  # Linux: a thread's own nice value; the checkpoint gives way to the threads that serve requests
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass  # elsewhere it runs at the process's priority
        conn = self._engine.raw_connection()
        dbapi = conn.driver_connection
        if self._shm_fd < 0:
            self._shm_fd = os.open(self._shm, os.O_RDONLY)  # exists while a connection is open in WAL mode
        # a RESTART checkpoint holds new writers back while it waits for readers: not longer than this
        dbapi.execute("PRAGMA busy_timeout=200")  # type: ignore[union-attr]
        try:
            while True:
                self._due.wait()
                self._due.clear()
                if self._stopping.is_set():
                    return
                backlog = _wal_backlog(self._shm_fd)
                if backlog is not None and backlog < _CHECKPOINT_PAGES:
                    continue
                try:
                    _busy, frames, _copied = dbapi.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # type: ignore[union-attr]
                    if frames >= _WAL_BACKSTOP_PAGES:
                        dbapi.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()  # type: ignore[union-attr]
                except self._engine.dialect.dbapi.Error as exc:  # type: ignore[union-attr]
                    # the next transaction tries again; SQLite's own checkpoint is the backstop
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            dbapi.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")  # type: ignore[union-attr]  # as the pool lent it
            conn.close()


class _CompiledStatement:
    """A Core statement compiled once for the dialect, run on a DBAPI cursor: ``parameters()`` gives
    the driver's parameters (positional or named, as its paramstyle wants) with every bound value
    passed through the column type's bind processor, as ``Connection.execute`` would."""

    def __init__(self, statement: Any, dialect: Any, keys: list[str]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        self.sql = str(compiled)
        self._compiled = compiled
        self._order: Sequence[str] | None = compiled.positiontup if compiled.positional else None
        self._processors = {
            name: processor
            for name, bind in compiled.binds.items()
            if (processor := bind.type._cached_bind_processor(dialect)) is not None
        }

    def parameters(self, values: Mapping[str, Any]) -> Any:
        params = self._compiled.construct_params(values, _check=False)
        for name, processor in self._processors.items():
            if name in params:
                params[name] = processor(params[name])
        if self._order is not None:
            return tuple(params[name] for name in self._order)
        return params


class Store:
    """Thread-safe facade over the database. Every public method is one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        # JSON columns (FHIR content above all) read by orjson: a search's page of resources was decoded by
        # json.loads in ~14% of its time on PostgreSQL. (Like the FHIR API's request bodies, an integer
        # beyond 64 bits comes back as the nearest double.)
        kwargs: dict[str, Any] = {"future": True, "json_deserializer": orjson.loads}
        sqlite = url.startswith("sqlite")
        if sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            # a server can drop idle connections (a local file cannot): see _ping_when_idle
            kwargs.update(pool_size=10)
            # psycopg prepares a statement after 5 runs and PostgreSQL may then keep a generic plan, blind to
            # the searched value: a FHIR search on a rare code and on a common one need different plans.
            # No parallel workers: every statement here reads one page or one transaction's rows, and a
            # Gather Merge over a walk of the resources took 150 ms where the serial walk takes 7 ms
            kwargs["connect_args"] = {
                "options": "-c plan_cache_mode=force_custom_plan -c max_parallel_workers_per_gather=0"
            }
        self.engine = create_engine(url, **kwargs)
        if not sqlite:
            _ping_when_idle(self.engine)
        self._checkpointer: _WalCheckpointer | None = None
        self._lookup: Any = None  # SQLite: the connection holds_instance keeps (see there), from start to stop
        self._lookup_lock = threading.Lock()
        if sqlite:
            _enable_sqlite_wal(self.engine)
            database = self.engine.url.database
            if database and database != ":memory:":
                self._checkpointer = _WalCheckpointer(self.engine, database)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # reads (FHIR reads and searches) on PostgreSQL: statements in autocommit, see read_session
        reads = self.engine if sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._read_sessions = sessionmaker(reads, expire_on_commit=False)

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        # tables declared beside the code that owns them: on Base before create_all, whoever starts the store
        # (without them, a store started by anything but the runtime answered their routes 503)
        import integration.dicom_export_queue  # noqa: F401
        import integration.upstream  # noqa: F401

        try:
            Base.metadata.create_all(self.engine)
            versions_had_times = "last_updated" in self._columns("fhir_resource_versions")
            self._add_missing_columns()
            self._add_new_columns(backfill_times=not versions_had_times)
        except OperationalError as exc:
            raise StoreUnavailableError(
                f"cannot open the database ({exc.orig}); check DATABASE_URL and that the server is running"
            ) from exc
        if self._checkpointer is not None:
            self._checkpointer.start()
            if self._lookup is None:
                self._lookup = self.engine.raw_connection()

    def _columns(self, table: str) -> set[str]:
        return {c["name"] for c in inspect(self.engine).get_columns(table)}

    def _add_new_columns(self, *, backfill_times: bool) -> None:
        """FHIR columns added after a table's first release, their values, and the search index."""
        if "last_updated" not in self._columns("fhir_resource_versions"):
            kind = "TIMESTAMP WITH TIME ZONE" if self.engine.dialect.name == "postgresql" else "DATETIME"
            with self.engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE fhir_resource_versions ADD COLUMN last_updated {kind}")
                conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_fhir_versions_type_updated "
                                     "ON fhir_resource_versions (resource_type, last_updated)")
        self._upgrade_search_index()
        # resources stored before the search index existed: index them once (imported here, see put_resource)
        from integration.fhir_search import backfill_version_times, reindex_if_empty

        if backfill_times:
            backfill_version_times(self)
        reindex_if_empty(self)

    def _upgrade_search_index(self) -> None:
        """The covering value index replaces the one without resource_id (databases before 2026-12-01), and
        the index on the always-NULL ``fhir_resources.identifier`` goes; on
        PostgreSQL, statistics on (resource_type, param, value) together. The planner otherwise multiplies
        three independent frequencies and guesses a tenth of a common code's matches: it then sorts every
        match instead of walking the resources newest first (see fhir_search.run_search)."""
        for index in cast(Table, FhirSearchIndex.__table__).indexes:
            index.create(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX IF EXISTS ix_fhir_search_value")
            conn.exec_driver_sql("DROP INDEX IF EXISTS ix_fhir_resources_identifier")  # before 2026-12-01
            if self.engine.dialect.name == "postgresql" and (conn.dialect.server_version_info or (0,)) >= (12,):
                # (MCV statistics exist from PostgreSQL 12; older servers keep the per-column estimate)
                conn.exec_driver_sql("CREATE STATISTICS IF NOT EXISTS fhir_search_index_value_stats (mcv) "
                                     "ON resource_type, param, value FROM fhir_search_index")
                # a larger sample than the default 100 (more common codes of each type); 1,000 added 1-2 ms
                # of planning to every search
                conn.exec_driver_sql("ALTER STATISTICS fhir_search_index_value_stats SET STATISTICS 300")

    def stop(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._lookup is not None:
            with self._lookup_lock:
                self._lookup.close()  # back to the pool, which dispose() closes, before release()
                self._lookup = None
        self.engine.dispose()
        if self._checkpointer is not None:
            self._checkpointer.release()

    def _add_missing_columns(self) -> None:
        """Columns appended to a model after its table was created (nullable ones): ADD COLUMN, and
        their indexes, so a database from an earlier version opens without a migration tool."""
        inspector = inspect(self.engine)
        for table in Base.metadata.sorted_tables:
            if not inspector.has_table(table.name):
                continue
            present = {c["name"] for c in inspector.get_columns(table.name)}
            missing = [c for c in table.columns if c.name not in present and c.nullable]
            if not missing:
                continue
            with self.engine.begin() as conn:
                for column in missing:
                    kind = column.type.compile(dialect=self.engine.dialect)
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
            for index in table.indexes:
                index.create(self.engine, checkfirst=True)

    def healthy(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - health probes report, they do not raise
            return False

    @contextmanager
    def session(self) -> Iterator[Session]:
        with _unavailable_as_store_error(), self._sessions.begin() as s:
            yield s

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session that only reads. On PostgreSQL its statements run in autocommit: no BEGIN and COMMIT,
        two of a FHIR search's six round trips to the server (~1 ms of ~15 here). Each statement sees
        what was committed when it started, as each does in a READ COMMITTED transaction (the default),
        so a read of several statements is as consistent as before. On SQLite the same as ``session``
        (pysqlite begins no transaction for a SELECT)."""
        with _unavailable_as_store_error(), self._read_sessions() as s:
            yield s

    # outbox ----------------------------------------------------------------------------------
    @staticmethod
    def add_to_outbox(s: Session, topic: str, event: BaseModel, key: str | None) -> None:
        s.add(
            OutboxEntry(
                event_id=event.event_id,
                topic=topic,
                key=key,
                event_type=event.event_type,
                payload=event.model_dump_json(),
            )
        )

    def pending_outbox(self, limit: int = 100) -> list[OutboxEntry]:
        with self.session() as s:
            rows = s.scalars(
                select(OutboxEntry).where(OutboxEntry.published_at.is_(None)).order_by(OutboxEntry.id).limit(limit)
            )
            return list(rows)

    def mark_published(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self.session() as s:
            s.execute(
                update(OutboxEntry)
                .where(OutboxEntry.id.in_(ids))
                .values(published_at=utcnow(), publish_count=OutboxEntry.publish_count + 1)
            )

    def requeue_unprocessed(
        self, consumers_by_topic: dict[str, str], older_than_seconds: float, max_publishes: int = 5
    ) -> int:
        """Mark published events that their consumer never processed as pending again.

        The embedded broker forgets everything when it restarts, and a real cluster can lose a topic
        too: the store, not Kafka, decides what is done. Returns how many events were requeued.
        """
        cutoff = datetime.fromtimestamp(time.time() - older_than_seconds, UTC)
        total = 0
        with self.session() as s:
            for topic, consumer in consumers_by_topic.items():
                done = select(ProcessedEvent.event_id).where(ProcessedEvent.consumer == consumer)
                dead = select(DeadLetter.event_id).where(DeadLetter.event_id.is_not(None))
                result = s.execute(
                    update(OutboxEntry)
                    .where(
                        OutboxEntry.topic == topic,
                        OutboxEntry.published_at.is_not(None),
                        OutboxEntry.published_at < cutoff,
                        OutboxEntry.publish_count < max_publishes,
                        OutboxEntry.event_id.not_in(done),
                        OutboxEntry.event_id.not_in(dead),
                    )
                    .values(published_at=None)
                )
                total += result.rowcount  # type: ignore[attr-defined]
        return total

    def outbox_backlog(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).where(OutboxEntry.published_at.is_(None))) or 0

    # change tracking (quiet periods) ---------------------------------------------------------
    @staticmethod
    def touch(s: Session, kind: str, key: str, *, at: float | None = None) -> None:
        """Bump the tracker of ``kind``/``key`` (created at revision 1): one upsert, one round trip."""
        now = time.time() if at is None else at
        s.execute(_tracker_touch(s.get_bind().dialect.name), {"kind": kind, "key": key, "now": now})

    def expedite(self, kind: str, keys: Sequence[str], quiet_seconds: float) -> None:
        """Make trackers due now (used when an association is released)."""
        if not keys:
            return
        with self.session() as s:
            s.execute(
                update(ChangeTracker)
                .where(ChangeTracker.kind == kind, ChangeTracker.key.in_(list(keys)))
                .values(last_change_at=time.time() - quiet_seconds - 1)
            )

    def due_trackers(self, kind: str, quiet_seconds: float) -> list[ChangeTracker]:
        cutoff = time.time() - quiet_seconds
        with self.session() as s:
            rows = s.scalars(
                select(ChangeTracker).where(
                    ChangeTracker.kind == kind,
                    ChangeTracker.revision > ChangeTracker.published_revision,
                    ChangeTracker.last_change_at <= cutoff,
                )
            )
            return list(rows)

    @staticmethod
    def claim_tracker(s: Session, tracker: ChangeTracker) -> bool:
        """Mark the revision we read as published; False when it changed meanwhile (try later)."""
        result = s.execute(
            update(ChangeTracker)
            .where(
                ChangeTracker.kind == tracker.kind,
                ChangeTracker.key == tracker.key,
                ChangeTracker.revision == tracker.revision,
                # re-checked after a concurrent claimer's commit: only one process announces a revision
                ChangeTracker.published_revision < tracker.revision,
            )
            .values(published_revision=tracker.revision)
        )
        return result.rowcount == 1  # type: ignore[attr-defined]

    # DICOM -----------------------------------------------------------------------------------
    def add_instance(self, values: Mapping[str, Any], place_file: Callable[[], None]) -> bool:
        """Record an instance (``values``: ``DicomInstance`` column values) in one transaction; False
        when that SOP Instance UID is already held (the first is kept). ``place_file`` moves the file
        into place just before the commit, so a row never points at a missing file.

        This runs once per C-STORE, so its two statements (the insert, and the upsert that bumps the
        study's tracker) are compiled once and run on the DBAPI cursor with SQLAlchemy's own bind
        processors: a quarter of the cost of ``Connection.execute`` here.
        """
        insert, touch = self._instance_statements()
        row = {**values, "received_at": values.get("received_at") or utcnow()}

        def record(columns: Mapping[str, Any]) -> bool:
            with self._dbapi_cursor(transaction=True) as cursor:
                cursor.execute(insert.sql, insert.parameters(columns))
                if cursor.fetchone() is None:  # RETURNING gives no row on a conflict
                    return False
                place_file()
                cursor.execute(touch.sql, touch.parameters(
                    {"kind": "study", "key": values["study_instance_uid"], "now": time.time()}))
            return True

        try:
            return record(row)
        except StoreUnavailableError as exc:
            if not self._refuses_a_value(exc, row):
                raise
        return record(_without_query_columns(row))

    def add_instances(self, rows: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Record instances whose files are already in place, in one transaction (the receive
        journal's row writer: one commit per batch instead of per C-STORE). For each row, False
        when its SOP Instance UID was already held (the first is kept). Each study's tracker is
        bumped once."""
        insert, touch = self._instance_statements()
        if len(rows) == 1:
            try:
                return self._add_instances(rows, insert, touch)
            except StoreUnavailableError as exc:
                if not self._refuses_a_value(exc, rows[0]):
                    raise
            return self._add_instances([_without_query_columns(rows[0])], insert, touch)
        return self._add_instances(rows, insert, touch)

    def _refuses_a_value(self, exc: StoreUnavailableError, row: Mapping[str, Any]) -> bool:
        """True (and logged) when the driver refused one of ``row``'s values (a PEP 249 DataError:
        NUL in text, a number out of range, a string too long for its column) rather than the
        database being unavailable: the caller stores the instance without its query columns,
        instead of refusing it (0xA700, which the sender would retry for ever) or holding it back."""
        cause = getattr(exc.__cause__, "orig", exc.__cause__)
        if not isinstance(cause, self.engine.dialect.dbapi.DataError):  # type: ignore[union-attr]
            return False
        log.error("the database refuses a query column of instance %s (%s): it is stored without them; "
                  "C-FIND and QIDO-RS find it by its UIDs only", uid_hash(str(row["sop_instance_uid"])),
                  type(cause).__name__)
        return True

    def _add_instances(self, rows: Sequence[Mapping[str, Any]], insert: _CompiledStatement,
                       touch: _CompiledStatement) -> list[bool]:
        now = time.time()
        added = []
        with self._dbapi_cursor(transaction=True) as cursor:
            for row in rows:
                cursor.execute(insert.sql, insert.parameters(row))
                added.append(cursor.fetchone() is not None)  # RETURNING gives no row on a conflict
            studies = (r["study_instance_uid"] for r, new in zip(rows, added, strict=True) if new)
            for study in dict.fromkeys(studies):
                cursor.execute(touch.sql, touch.parameters({"kind": "study", "key": study, "now": now}))
        return added

    def holds_instance(self, sop_uid: str) -> bool:
        """True when an instance of this SOP Instance UID is recorded: one index lookup on the DBAPI
        cursor (~35 us against ~375 for ``get_instance``), since this runs once per C-STORE.

        On SQLite, on a connection kept for it rather than one from the pool: ~7 us against ~60, and
        no check-in, whose event wakes the WAL checkpointer thread (for a transaction that wrote
        nothing) just as the C-STORE's thread wants the GIL back: 250 us per lookup in the listener."""
        lookup = self._holds_statement()
        if self._lookup is not None:
            try:
                with self._lookup_lock:
                    # fetchall: the statement runs to its end, so no read transaction stays open
                    rows = self._lookup.driver_connection.execute(
                        lookup.sql, lookup.parameters({"sop_instance_uid": sop_uid})).fetchall()
                return bool(rows)
            except self.engine.dialect.dbapi.Error as exc:  # type: ignore[union-attr]
                raise StoreUnavailableError(f"database unavailable: {exc}") from exc
        with self._dbapi_cursor(transaction=False) as cursor:
            cursor.execute(lookup.sql, lookup.parameters({"sop_instance_uid": sop_uid}))
            return cursor.fetchone() is not None

    @contextmanager
    def _dbapi_cursor(self, *, transaction: bool) -> Iterator[Any]:
        """A DBAPI cursor for the compiled statements of the per-instance paths, inside one
        transaction (committed when the block ends) or on a plain connection; the driver's errors
        become StoreUnavailableError, as the session's do."""
        dbapi_error = self.engine.dialect.dbapi.Error  # type: ignore[union-attr]
        try:
            with self.engine.begin() if transaction else self.engine.connect() as conn:
                cursor = conn.connection.cursor()
                try:
                    yield cursor
                finally:
                    cursor.close()
        except (OperationalError, dbapi_error) as exc:
            raise StoreUnavailableError(f"database unavailable: {getattr(exc, 'orig', exc)}") from exc

    @cache  # noqa: B019 - one Store per process; compiled once
    def _holds_statement(self) -> _CompiledStatement:
        column = DicomInstance.__table__.c.sop_instance_uid
        return _CompiledStatement(select(column).where(column == bindparam("sop_instance_uid")),
                                  self.engine.dialect, ["sop_instance_uid"])

    @cache  # noqa: B019 - one Store per process; compiled once, not per instance
    def _instance_statements(self) -> tuple[_CompiledStatement, _CompiledStatement]:
        """The INSERT of an instance (nothing on a duplicate) and the tracker upsert that ``touch`` uses."""
        dialect = self.engine.dialect
        instances = DicomInstance.__table__
        insert = (
            _dialect_insert(dialect.name, instances)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(instances.c.sop_instance_uid)
        )
        # dicom_json stays NULL until first use (see dicom_query.QueryEngine.with_json), announced_revision
        # until the study is announced (publisher.announce_study)
        columns = [c.key for c in instances.columns if c.key not in ("dicom_json", "announced_revision")]
        return (_CompiledStatement(insert, dialect, columns),
                _CompiledStatement(_tracker_touch(dialect.name), dialect, ["kind", "key", "now"]))

    @staticmethod
    def instances_in(s: Session, study_uid: str) -> list[DicomInstance]:
        rows = s.scalars(
            select(DicomInstance)
            .where(DicomInstance.study_instance_uid == study_uid)
            .order_by(DicomInstance.series_instance_uid, DicomInstance.received_at)
        )
        return list(rows)

    @staticmethod
    def mark_announced(s: Session, study_uid: str, revision: int) -> int:
        """Give the study's instances that no announcement included yet to ``revision``; how many."""
        result = s.execute(
            update(DicomInstance)
            .where(DicomInstance.study_instance_uid == study_uid, DicomInstance.announced_revision.is_(None))
            .values(announced_revision=revision)
        )
        return result.rowcount  # type: ignore[attr-defined]

    def study_instances(self, study_uid: str) -> list[DicomInstance]:
        with self.session() as s:
            return self.instances_in(s, study_uid)

    def get_instance(self, sop_uid: str) -> DicomInstance | None:
        with self.session() as s:
            return s.get(DicomInstance, sop_uid)

    # FHIR ------------------------------------------------------------------------------------
    @staticmethod
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

    @staticmethod
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
        from integration.fhir_search import index_rows

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

    @staticmethod
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
        lock should not be held for longer; a validation worker, integration.fhir_validation, has until
        then)."""
        from integration.fhir_search import INDEX_COLUMNS, index_tuples

        keys = [(r["resourceType"], r["id"]) for r in resources]
        dialect = s.get_bind().dialect
        streamed = meanwhile is not None and _can_pipeline(dialect.name, dialect.driver)
        if not keys or len(set(keys)) != len(keys):
            if meanwhile is not None:
                meanwhile()
            return [Store.put_resource(s, r, subject_ref=ref) for r, ref in zip(resources, subject_refs, strict=True)]
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

    @staticmethod
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

    def get_resource(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        with self.read_session() as s:
            row = s.get(FhirResource, (resource_type, resource_id))
            if row is None:
                raise ResourceNotFoundError(resource_type, resource_id)
            if row.deleted:
                raise ResourceGoneError(resource_type, resource_id)
            return row.content

    def get_version(self, resource_type: str, resource_id: str, version_id: int) -> dict[str, Any]:
        with self.read_session() as s:
            row = s.get(FhirResourceVersion, (resource_type, resource_id, version_id))
            if row is None:
                raise ResourceNotFoundError(resource_type, f"{resource_id}/_history/{version_id}")
            if row.deleted:
                raise ResourceGoneError(resource_type, f"{resource_id}/_history/{version_id}")
            return row.content

    def history(self, resource_type: str, resource_id: str) -> list[tuple[dict[str, Any], bool]]:
        """Every version, newest first, as (content, deleted)."""
        with self.read_session() as s:
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

    def search_resources(
        self,
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
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            page = s.scalars(q.order_by(FhirResource.last_updated.desc(), FhirResource.id).limit(limit).offset(offset))
            return [r.content for r in page], total

    # consumers -------------------------------------------------------------------------------
    def is_processed(self, consumer: str, event_id: str) -> bool:
        with self.session() as s:
            return s.get(ProcessedEvent, (consumer, event_id)) is not None

    @staticmethod
    def mark_processed(s: Session, consumer: str, event_id: str) -> None:
        if s.get(ProcessedEvent, (consumer, event_id)) is None:
            s.add(ProcessedEvent(consumer=consumer, event_id=event_id))

    def record_dead_letter(self, consumer: str, topic: str, event_id: str | None, error: str, payload: bytes) -> None:
        with self.session() as s:
            s.add(
                DeadLetter(
                    consumer=consumer,
                    topic=topic,
                    event_id=event_id,
                    error=error[:4000],
                    payload=payload.decode("utf-8", "replace"),
                )
            )

    def dead_letters(self) -> list[DeadLetter]:
        with self.session() as s:
            return list(s.scalars(select(DeadLetter).order_by(DeadLetter.id)))

    # AI results and reviews ------------------------------------------------------------------
    def get_ai_result(self, report_id: str) -> AiResult | None:
        with self.session() as s:
            return s.get(AiResult, report_id)

    def reviews_for(self, report_id: str) -> list[Review]:
        with self.session() as s:
            return list(s.scalars(select(Review).where(Review.report_id == report_id).order_by(Review.id)))
