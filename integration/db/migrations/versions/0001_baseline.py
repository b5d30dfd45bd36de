"""Baseline: the schema of 2026-12, when migrations began (integration.db.migrations.baseline).

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

from integration.db.migrations.baseline import BASELINE, finish_search_index

revision: str = "0001_baseline"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bind = op.get_bind()
    BASELINE.create_all(bind)
    finish_search_index(bind)


def downgrade() -> None:
    BASELINE.drop_all(op.get_bind())
