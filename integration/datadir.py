"""What MedBridge creates under its data dir is its own: files 0600, folders 0700.

The data dir holds patient data (DICOM files, the database, heatmaps) and keys. The runtime sets the
process umask to 077 at start (``keep_private``), which covers every file a library creates for us
(SQLite's journal and WAL, ChromaDB, torch's caches); the DICOM store and journal also pass the modes
explicitly, so they are private whichever process or umask writes them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700


def keep_private() -> None:
    """Files and folders this process creates from now on are for its user only (umask 077)."""
    os.umask(0o077)


def private_folder(path: Path) -> None:
    """Create ``path`` (and missing parents) for the owner only; an existing folder is left as it is."""
    path.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)


def open_private(path: Path) -> BinaryIO:
    """``open(path, "wb")``, creating the file 0600."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "wb")
