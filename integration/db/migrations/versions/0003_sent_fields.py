"""upstream_reports.sent_fields: the fields MedBridge owns as it last sent them (the writeback's 412 merge).

Revision ID: 0003_sent_fields
Revises: 0002_upgrade_progress
Create Date: 2026-12-06 09:30:47.456237

Made by ``medbridge db revision``: review every operation before committing it. A NOT NULL column on a
table that has rows needs a server_default (or a nullable column, a backfill, then NOT NULL): without one
the upgrade fails, as it should, rather than skipping the column.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003_sent_fields'
down_revision: str | Sequence[str] | None = '0002_upgrade_progress'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('upstream_reports', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sent_fields', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('upstream_reports', schema=None) as batch_op:
        batch_op.drop_column('sent_fields')
