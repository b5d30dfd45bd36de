"""Rendered frames kept in memory, so a reviewer scrolling back and forth through a study (or several
reviewers on one study) gets each frame without reading and rendering its file again.

An instance's bytes never change under its SOP Instance UID in MedBridge's store (a duplicate keeps the
first), so a frame rendered with the same parameters is the same image: the cache key is what was asked
for, and the ETag a digest of it. Bounded by bytes, least recently used first out; thread-safe, since
rendering runs on the request threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class RenderedCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:  # one huge frame must not flush everything else
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._size -= len(old) if old is not None else 0
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)


def etag_of(key: Hashable) -> str:
    """A strong ETag for the rendering ``key`` names (the same request always renders the same bytes)."""
    return '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:32] + '"'
