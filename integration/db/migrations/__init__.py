"""Alembic's scripts for MedBridge's schema: ``env.py`` (driven by integration.db.schema, no alembic.ini),
the frozen baseline (``baseline.py``) and one script per schema change in ``versions/``."""
