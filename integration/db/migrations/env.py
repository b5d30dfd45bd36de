"""Alembic's environment, run by integration.db.schema with the connection it holds (under the migration
lock) in ``config.attributes["connection"]``; ``medbridge db revision`` runs it the same way."""

from __future__ import annotations

from alembic import context

from integration.db.migrations.env_options import include_object
from integration.db.tables import Base


def run_migrations() -> None:
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_object=include_object,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters a table by copying it
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
