"""pending_since on change trackers: the clinical debounce's maximum wait

Revision ID: 0007_tracker_pending_since
Revises: 0006_trace_context_on_outbox_row
Create Date: 2026-12-06 16:20:00

A nullable column: trackers from before it have none, and are announced by their quiet period alone until
their next change sets it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007_tracker_pending_since'
down_revision: str | Sequence[str] | None = '0006_trace_context_on_outbox_row'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('change_trackers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pending_since', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('change_trackers', schema=None) as batch_op:
        batch_op.drop_column('pending_since')
