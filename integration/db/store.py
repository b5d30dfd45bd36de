"""The durable store: the source of truth for everything MedBridge received or produced.

SQLAlchemy on SQLite by default, PostgreSQL when ``DATABASE_URL`` says so. Kafka only carries
notifications: every event is first written to the ``outbox`` table in the same transaction as
the state it announces, and the outbox relay publishes it (at least once).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from pydantic import BaseModel
from sqlalchemy import (
    String,
    bindparam,
    case,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from integration.db import schema
from integration.db.tables import (
    AiResult,
    Base,  # noqa: F401 - re-exported: callers create tables from it
    ChangeTracker,
    DeadLetter,
    DicomInstance,
    OutboxEntry,
    ProcessedEvent,
    Review,
    utcnow,
)
from integration.errors import (
    QueryTooComplexError,
    StoreUnavailableError,
)
from integration.observability import tracing
from integration.phi import uid_hash

log = logging.getLogger(__name__)

# what an instance's row cannot do without; the rest are query columns, copies of values in its file
_INSTANCE_ESSENTIALS = frozenset({"sop_instance_uid", "study_instance_uid", "series_instance_uid", "sop_class_uid",
                                  "transfer_syntax_uid", "is_image", "path", "size", "received_at"})


def _without_query_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    query_columns = (c.key for c in DicomInstance.__table__.columns if c.key not in _INSTANCE_ESSENTIALS)
    return {**dict.fromkeys(query_columns), **{k: v for k, v in row.items() if k in _INSTANCE_ESSENTIALS}}



def _dialect_insert(dialect: str, table: Any) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (SQLite and PostgreSQL spell it alike)."""
    return postgresql_insert(table) if dialect == "postgresql" else sqlite_insert(table)


_TRACEPARENT = bindparam("traceparent", type_=String())  # typed: PostgreSQL must know it inside CASE


@cache
def _tracker_touch(dialect: str) -> Any:
    """The upsert that creates a change tracker at revision 1 or bumps its revision (``kind``, ``key``, ``now``)."""
    trackers = ChangeTracker.__table__
    return (
        _dialect_insert(dialect, trackers)
        .values(kind=bindparam("kind"), key=bindparam("key"), revision=1, published_revision=0,
                last_change_at=bindparam("now"), pending_since=bindparam("now"), traceparent=_TRACEPARENT)
        .on_conflict_do_update(
            index_elements=["kind", "key"],
            set_={"revision": trackers.c.revision + 1, "last_change_at": bindparam("now"),
                  # the first change after an announcement starts the wait the maximum is counted from
                  "pending_since": case(
                      (trackers.c.revision == trackers.c.published_revision, bindparam("now")),
                      else_=func.coalesce(trackers.c.pending_since, bindparam("now"))),
                  # a change after the last announcement starts the next revision's trace; a change
                  # within the quiet period joins the trace of the revision's first change
                  "traceparent": case(
                      (trackers.c.revision == trackers.c.published_revision, _TRACEPARENT),
                      else_=func.coalesce(trackers.c.traceparent, _TRACEPARENT))},
        )
    )





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
        if _too_complex(exc):
            raise QueryTooComplexError(f"the database refused the statement as too large: {exc.orig}") from exc
        raise StoreUnavailableError(f"database unavailable: {exc.orig}") from exc


# what SQLite says of a statement past its limits (SQLITE_LIMIT_EXPR_DEPTH, SQLITE_MAX_VARIABLE_NUMBER, YYSTACKDEPTH)
_SQLITE_TOO_COMPLEX = ("expression tree is too large", "too many sql variables", "parser stack overflow")


def _too_complex(exc: OperationalError) -> bool:
    """Whether ``exc`` is a statement the database will refuse every time (too deep, too many values),
    rather than the database being unavailable: SQLite's messages, PostgreSQL's class 54 (program limit
    exceeded, such as ``stack depth limit exceeded``)."""
    if str(getattr(exc.orig, "sqlstate", "") or "").startswith("54"):
        return True
    return any(m in str(exc.orig).lower() for m in _SQLITE_TOO_COMPLEX)


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

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_conn: Any, record: Any) -> None:
        # a durable session's connection (_make_durable) is back: the next borrower gets NORMAL again
        if record.info.pop("durable", False) and dbapi_conn is not None:
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")


def _make_durable(s: Session) -> None:
    """``synchronous=FULL`` on the session's SQLite connection until it goes back to the pool (see
    ``_enable_sqlite_wal``'s check-in handler). Set before the transaction's first write: pysqlite begins
    no transaction for a PRAGMA, so it applies to the commit that ends this one."""
    conn = s.connection()
    conn.exec_driver_sql("PRAGMA synchronous=FULL")
    conn.connection.info["durable"] = True  # the pool entry's info, which the check-in handler reads


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
        # hide_parameters: an error SQLAlchemy raises (and a caller may log) shows the statement without its
        # values, which are patient data (names, identifiers, FHIR content)
        kwargs: dict[str, Any] = {"future": True, "json_deserializer": orjson.loads, "hide_parameters": True}
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
        """Open the database and bring its schema to this version (integration.db.schema: Alembic, once,
        under a lock, by the first process that starts; the others wait and find it done)."""
        try:
            schema.upgrade(self.engine)
        except OperationalError as exc:
            raise StoreUnavailableError(
                f"cannot open the database ({exc.orig}); check DATABASE_URL and that the server is running"
            ) from exc
        if self._checkpointer is not None:
            self._checkpointer.start()
            if self._lookup is None:
                self._lookup = self.engine.raw_connection()

    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """The database-wide lock ``name`` held for a block, across processes (a one-time upgrade that
        every process starts but one must do: see integration.db.schema.exclusive)."""
        return schema.exclusive(self.engine, name)

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

    def healthy(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - health probes report, they do not raise
            return False

    @contextmanager
    def session(self, *, durable: bool = False) -> Iterator[Session]:
        """One transaction, committed when the block ends. ``durable``: the commit survives a power cut
        before it returns. Give it to every transaction behind an acknowledgement (a 2xx FHIR write, a
        review decision). On SQLite the connection then runs ``synchronous=FULL`` for this transaction
        (WAL synced at each commit); the others keep ``NORMAL`` (synced at checkpoints: a commit can be
        lost on a power cut, never corrupted). PostgreSQL's default ``synchronous_commit=on`` is durable
        already."""
        with _unavailable_as_store_error(), self._sessions.begin() as s:
            if durable and self.engine.dialect.name == "sqlite":
                _make_durable(s)
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
                traceparent=tracing.current_traceparent(),  # the relay's send continues this trace
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
                # a dead letter not replayed yet: its event waits for an administrator, not for redelivery
                dead = select(DeadLetter.event_id).where(DeadLetter.event_id.is_not(None),
                                                         DeadLetter.replayed_at.is_(None))
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
        s.execute(_tracker_touch(s.get_bind().dialect.name),
                  {"kind": kind, "key": key, "now": now, "traceparent": tracing.current_traceparent()})

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

    def due_trackers(self, kind: str, quiet_seconds: float,
                     max_wait_seconds: float | None = None) -> list[ChangeTracker]:
        """Trackers with an unannounced change, quiet for ``quiet_seconds``, or (with ``max_wait_seconds``)
        changing all along since a first change that long ago."""
        now = time.time()
        due = ChangeTracker.last_change_at <= now - quiet_seconds
        if max_wait_seconds is not None:
            due = or_(due, ChangeTracker.pending_since <= now - max_wait_seconds)
        with self.session() as s:
            rows = s.scalars(
                select(ChangeTracker).where(
                    ChangeTracker.kind == kind,
                    ChangeTracker.revision > ChangeTracker.published_revision,
                    due,
                ).order_by(ChangeTracker.last_change_at, ChangeTracker.key)  # oldest first, deterministically
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
                    {"kind": "study", "key": values["study_instance_uid"], "now": time.time(),
                     "traceparent": tracing.current_traceparent()}))
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
        traceparent = tracing.current_traceparent()
        added = []
        with self._dbapi_cursor(transaction=True) as cursor:
            for row in rows:
                cursor.execute(insert.sql, insert.parameters(row))
                added.append(cursor.fetchone() is not None)  # RETURNING gives no row on a conflict
            studies = (r["study_instance_uid"] for r, new in zip(rows, added, strict=True) if new)
            for study in dict.fromkeys(studies):
                cursor.execute(touch.sql, touch.parameters({"kind": "study", "key": study, "now": now,
                                                                  "traceparent": traceparent}))
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
                _CompiledStatement(_tracker_touch(dialect.name), dialect, ["kind", "key", "now", "traceparent"]))

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
