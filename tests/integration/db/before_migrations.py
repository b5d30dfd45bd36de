"""Make a migrated test database look like one from a release before migrations (no alembic_version),
so tests can drop what an older release lacked and watch the start bring it back."""

from __future__ import annotations

from alembic import command
from sqlalchemy.engine import Connection

from integration.db import schema
from integration.db.migrations.baseline import BASELINE_REVISION


def as_before_migrations(conn: Connection) -> None:
    """Back to the baseline, without a trace of the migrations (a release from before them had none)."""
    command.downgrade(schema.alembic_config(conn), BASELINE_REVISION)
    conn.exec_driver_sql("DROP TABLE alembic_version")
