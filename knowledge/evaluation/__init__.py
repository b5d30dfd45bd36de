"""Offline quality measurements of the knowledge base (called by `medbridge eval` and bench/)."""
