"""Keeping patient data out of logs: identifiers are logged only as keyed hashes (HMAC-SHA256).

A plain hash of an MRN-shaped id is reversed by hashing every candidate; a keyed one is not, without
the key. The key is made at first start under the data dir (``load_or_create_key``, file mode 0600)
and installed once per process by the composition root (``install_key``): the call sites, in every
edge and worker, log through ``uid_hash`` without carrying it. Until a key is installed (a library use
without the runtime) ``uid_hash`` logs no token at all rather than hash with a guessable key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "log-hash.key"
_KEY_BYTES = 32
UNKEYED = "unkeyed"

_key: bytes | None = None


def load_or_create_key(data_dir: Path) -> bytes:
    """The log-hash key under ``data_dir`` (``log-hash.key``, 0600), created at first use. Several processes
    may start at once (listener processes, pods on one volume): the key is written whole to a file of this
    process's own and linked into place, so whoever links first wins and nobody reads a half-written key."""
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        draft = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            draft.unlink()
    key = path.read_bytes()
    if len(key) < _KEY_BYTES:
        raise RuntimeError(f"{path} is shorter than {_KEY_BYTES} bytes; delete it to make a new key")
    return key


def install_key(key: bytes) -> None:
    """Use ``key`` for every ``uid_hash`` of this process (called once by the runtime at start)."""
    global _key
    if len(key) < _KEY_BYTES:
        raise ValueError(f"the log-hash key must be at least {_KEY_BYTES} bytes")
    _key = bytes(key)


def keyed_hash(key: bytes, value: str) -> str:
    """The first 16 hex digits (64 bits) of HMAC-SHA256(key, value)."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]


def uid_hash(value: str | None) -> str:
    """A short, stable (per key), non-reversible token for a UID or id, safe to log."""
    if not value:
        return "-"
    if _key is None:
        return UNKEYED
    return keyed_hash(_key, value)


def folder_name(uid: str) -> str:
    """The folder a study's files go in under the data dir: 12 hex digits of the UID's SHA-256. A layout
    name, not a log token (it stays the same across keys and releases, so stored paths keep working; the
    files in it hold the UID anyway). Never log it: log ``uid_hash``."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]
