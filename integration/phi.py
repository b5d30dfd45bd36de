"""Helpers that keep patient data out of logs: only salted-free short hashes of identifiers are logged."""

from __future__ import annotations

import hashlib


def uid_hash(value: str | None) -> str:
    """A short, stable, non-reversible token for a UID or id, safe to log."""
    if not value:
        return "-"
    return hashlib.sha256(value.encode()).hexdigest()[:12]
