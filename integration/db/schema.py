"""Schema migrations with Alembic: run once at start, under a lock, by whichever process starts first.

``upgrade(engine)`` takes the migration lock (PostgreSQL: an advisory lock; SQLite: ``fcntl.flock`` on a
file beside the database), brings a database made before migrations existed to the baseline (the tables
of 2026-12, without an ``alembic_version`` table) and stamps it, then upgrades to head. The other
processes wait on the lock and then find the database at head. ``make_revision`` writes a new script
from the difference between integration.db.tables and the database (``medbridge db revision``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from integration.db.migrations.baseline import BASELINE, BASELINE_REVISION, finish_search_index
from integration.db.migrations.env_options import include_object
from integration.db.tables import Base

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class SchemaUpgradeError(RuntimeError):
    """The database cannot be brought to this version's schema without a person deciding how."""


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for MedBridge's scripts, run on ``connection`` (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"medbridge:{name}".encode(), digest_size=8).digest(), "big", signed=True)


@contextmanager
def exclusive(engine: Engine, name: str) -> Iterator[None]:
    """Hold the database-wide lock ``name`` for the block, across processes and hosts: a PostgreSQL
    session advisory lock on a connection of its own; on SQLite an exclusive ``flock`` on
    ``<database>.<name>.lock`` beside the database file (an in-memory database has one process)."""
    if engine.dialect.name == "postgresql":
        key = _lock_key(name)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.{name}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def current_revision(engine: Engine) -> str | None:
    """The database's revision (None: no alembic_version table yet)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def upgrade(engine: Engine) -> None:
    """Bring the database to head, once, under the migration lock (see the module's docstring)."""
    with exclusive(engine, "migrate"), engine.begin() as conn:
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and tables & set(BASELINE.tables):
            log.info("database from before schema migrations: bringing it to the baseline in place")
            adopt_legacy(conn, tables)
            command.stamp(alembic_config(conn), BASELINE_REVISION)
        command.upgrade(alembic_config(conn), "head")


def adopt_legacy(conn: Connection, present: set[str]) -> None:
    """What ``Store.start`` did at each start before migrations (create_all, then ADD COLUMN for nullable
    columns added to a model later, then the search index's indexes), against the frozen baseline: a
    database from any earlier version ends up at the baseline. A missing NOT NULL column cannot be added
    to rows that exist: SchemaUpgradeError, never skipped."""
    for table in BASELINE.sorted_tables:
        if table.name not in present:
            table.create(conn)
            continue
        have = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable:
                raise SchemaUpgradeError(
                    f"table {table.name} lacks the NOT NULL column {column.name}, which cannot be added to "
                    "existing rows without a value: add it by hand with a default, then start again")
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_fhir_search_value")  # before 2026-12-01
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_fhir_resources_identifier")  # before 2026-12-01
    finish_search_index(conn)


def make_revision(engine: Engine, message: str) -> str:
    """A new script in ``versions/`` from the difference between integration.db.tables and ``engine``'s
    database (brought to head first), numbered after the head (``0003_<message>``); returns its path.
    Review it before committing it."""
    upgrade(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": include_object, "compare_type": True})
        if not compare_metadata(context, Base.metadata):
            raise SchemaUpgradeError("integration/db/tables.py matches the migrations head: no migration to write")
    # alembic_version.version_num is VARCHAR(32): the id, "0003_" and its slug, must fit
    slug = re.sub(r"[^a-z0-9]+", "_", message.lower())[:27].strip("_") or "change"
    number = int(head_revision().split("_", 1)[0]) + 1
    with engine.begin() as conn:
        config = alembic_config(conn)
        config.set_main_option("file_template", "%%(rev)s")  # the file is named as its revision
        script = command.revision(config, message=message, autogenerate=True, rev_id=f"{number:04d}_{slug}")
    assert script is not None and not isinstance(script, list)
    return str(script.path)
