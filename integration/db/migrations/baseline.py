"""The schema of 2026-12 (integration.db.tables as it was when migrations began), frozen: revision
``0001_baseline`` creates it in an empty database, and integration.db.schema.adopt_legacy brings a database
made before migrations to it (tables, the columns added since, indexes). Never edit it: a schema change is
a new script in ``versions/``. Rendered by Alembic's autogenerate from that tables.py, then reviewed."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

BASELINE_REVISION = "0001_baseline"

BASELINE = sa.MetaData()


def _partial(column: str) -> dict[str, Any]:
    """A partial index's WHERE on both engines: the rows whose ``column`` is not NULL."""
    return {"sqlite_where": sa.text(f"{column} IS NOT NULL"), "postgresql_where": sa.text(f"{column} IS NOT NULL")}


def _index(name: str, table: str, columns: list[str], **kwargs: Any) -> sa.Index:
    return sa.Index(name, *(BASELINE.tables[table].c[c] for c in columns), **kwargs)


sa.Table('ai_results', BASELINE,
    sa.Column('report_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('source_event_id', sa.String(length=64), nullable=False),
    sa.Column('subject_ref', sa.String(length=128), nullable=True),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('report_id')
)
sa.Table('artifacts', BASELINE,
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('media_type', sa.String(length=127), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
)
sa.Table('change_trackers', BASELINE,
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('published_revision', sa.Integer(), nullable=False),
    sa.Column('last_change_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'key')
)
_index('ix_change_trackers_last_change_at', 'change_trackers', ['last_change_at'])
sa.Table('dead_letters', BASELINE,
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('consumer', sa.String(length=64), nullable=False),
    sa.Column('topic', sa.String(length=128), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=True),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
)
sa.Table('delivery_jobs', BASELINE,
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('destination', sa.String(length=512), nullable=False),
    sa.Column('report_id', sa.String(length=64), nullable=False),
    sa.Column('what', sa.String(length=16), nullable=False),
    sa.Column('review_id', sa.Integer(), nullable=True),
    sa.Column('review_action', sa.String(length=32), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claim', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('delivered_as', sa.String(length=256), nullable=True),
    sa.PrimaryKeyConstraint('id')
)
_index('ix_delivery_jobs_due', 'delivery_jobs', ['kind', 'state', 'next_attempt_at'])
_index('ix_delivery_jobs_report', 'delivery_jobs', ['kind', 'destination', 'report_id'])
sa.Table('dicom_instances', BASELINE,
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('is_image', sa.Boolean(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('announced_revision', sa.Integer(), nullable=True),
    sa.Column('patient_name', sa.String(length=324), nullable=True),
    sa.Column('patient_birth_date', sa.String(length=8), nullable=True),
    sa.Column('patient_sex', sa.String(length=16), nullable=True),
    sa.Column('study_date', sa.String(length=8), nullable=True),
    sa.Column('study_time', sa.String(length=16), nullable=True),
    sa.Column('accession_number', sa.String(length=64), nullable=True),
    sa.Column('study_id', sa.String(length=16), nullable=True),
    sa.Column('study_description', sa.String(length=64), nullable=True),
    sa.Column('referring_physician_name', sa.String(length=324), nullable=True),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.Column('series_description', sa.String(length=64), nullable=True),
    sa.Column('body_part_examined', sa.String(length=16), nullable=True),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('series_date', sa.String(length=8), nullable=True),
    sa.Column('number_of_frames', sa.Integer(), nullable=True),
    sa.Column('dicom_json', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('sop_instance_uid')
)
_index('ix_dicom_instances_accession_number', 'dicom_instances', ['accession_number'])
_index('ix_dicom_instances_patient_id', 'dicom_instances', ['patient_id'])
_index('ix_dicom_instances_patient_name', 'dicom_instances', ['patient_name'])
_index('ix_dicom_instances_series_instance_uid', 'dicom_instances', ['series_instance_uid'])
_index('ix_dicom_instances_study_date', 'dicom_instances', ['study_date'])
_index('ix_dicom_instances_study_instance_uid', 'dicom_instances', ['study_instance_uid'])
sa.Table('fhir_resource_versions', BASELINE,
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('content', sa.JSON(), nullable=False),
    sa.Column('last_updated', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('resource_type', 'id', 'version_id')
)
_index('ix_fhir_versions_type_updated', 'fhir_resource_versions', ['resource_type', 'last_updated'])
sa.Table('fhir_resources', BASELINE,
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('last_updated', sa.DateTime(timezone=True), nullable=False),
    sa.Column('subject_ref', sa.String(length=128), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=True),
    sa.Column('identifier', sa.String(length=256), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('content', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('resource_type', 'id')
)
_index('ix_fhir_resources_status', 'fhir_resources', ['status'])
_index('ix_fhir_resources_subject_ref', 'fhir_resources', ['subject_ref'])
_index('ix_fhir_resources_type_updated', 'fhir_resources', ['resource_type', 'last_updated'])
sa.Table('fhir_search_index', BASELINE,
    sa.Column('row_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('system', sa.String(length=256), nullable=True),
    sa.Column('value', sa.String(length=256), nullable=True),
    sa.Column('date_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('date_end', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('row_id')
)
_index('ix_fhir_search_date_end', 'fhir_search_index', ['resource_type', 'param', 'date_end'],
       **_partial('date_end'))
_index('ix_fhir_search_date_start', 'fhir_search_index', ['resource_type', 'param', 'date_start'],
       **_partial('date_start'))
_index('ix_fhir_search_resource', 'fhir_search_index', ['resource_type', 'resource_id', 'param'])
_index('ix_fhir_search_value_id', 'fhir_search_index', ['resource_type', 'param', 'value', 'system', 'resource_id'],
       **_partial('value'))
sa.Table('local_users', BASELINE,
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('display_name', sa.String(length=200), nullable=True),
    sa.Column('password_hash', sa.String(length=256), nullable=False),
    sa.Column('roles', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
)
sa.Table('outbox', BASELINE,
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('topic', sa.String(length=128), nullable=False),
    sa.Column('key', sa.String(length=256), nullable=True),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('publish_count', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('event_id')
)
_index('ix_outbox_published_at', 'outbox', ['published_at'])
sa.Table('processed_events', BASELINE,
    sa.Column('consumer', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('consumer', 'event_id')
)
sa.Table('reviews', BASELINE,
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('report_id', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('reviewer', sa.String(length=200), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('conclusion', sa.Text(), nullable=True),
    sa.Column('reviewer_sub', sa.String(length=256), nullable=True),
    sa.Column('reason', sa.String(length=32), nullable=True),
    sa.Column('report_version', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id')
)
_index('ix_reviews_report_id', 'reviews', ['report_id'])
sa.Table('upstream_reports', BASELINE,
    sa.Column('upstream', sa.String(length=512), nullable=False),
    sa.Column('report_id', sa.String(length=64), nullable=False),
    sa.Column('upstream_id', sa.String(length=128), nullable=False),
    sa.Column('version_id', sa.String(length=128), nullable=True),
    sa.Column('result_refs', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('upstream', 'report_id')
)
# ### end Alembic commands ###


def finish_search_index(conn: Connection) -> None:
    """PostgreSQL: statistics on (resource_type, param, value) together. The planner otherwise multiplies
    three independent frequencies and guesses a tenth of a common code's matches: it then sorts every match
    instead of walking the resources newest first (see integration.fhir.search.run_search)."""
    if conn.dialect.name != "postgresql" or (conn.dialect.server_version_info or (0,)) < (12,):
        return  # MCV statistics exist from PostgreSQL 12; older servers keep the per-column estimate
    conn.exec_driver_sql("CREATE STATISTICS IF NOT EXISTS fhir_search_index_value_stats (mcv) "
                         "ON resource_type, param, value FROM fhir_search_index")
    # a larger sample than the default 100 (more common codes of each type); 1,000 added 1-2 ms of planning
    conn.exec_driver_sql("ALTER STATISTICS fhir_search_index_value_stats SET STATISTICS 300")
