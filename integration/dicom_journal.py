"""A write-ahead journal that makes a received instance durable with one sync into preallocated space.

A C-STORE may be answered only once its instance survives a power cut. Writing it as its own file
durably takes two syncs (the file, then its folder for the rename): ~0.75 ms here, the largest cost
of a C-STORE once the protocol is fast. Appending it to a journal segment whose blocks are already
allocated and written takes one ``fdatasync`` of data only (~0.25 ms: no metadata changes). The
instance file is then written and renamed into place *without* syncs; the journal covers it until
the next checkpoint, which syncs the file system once (``syncfs``) and recycles the segment.

Concurrent associations share syncs (group commit): a writer whose record was already covered by
another thread's ``fdatasync`` returns without one. A checkpoint waits until every journaled
instance is in place (``covering``), so the sync it does covers them all.

Layout: one segment file of ``segment_bytes``, zero-filled once when created. A 64-byte header holds
the magic and the segment's generation; records follow: magic, generation, payload length, CRC-32,
name length, the file's path relative to the storage folder, and the Part 10 bytes. Replay reads
records of the current generation until the first that does not check out (the torn tail of a
crash, or an older generation's leftovers), so a recycled segment is never zeroed again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_SEGMENT_MAGIC = b"MBJSEG01"
_RECORD_MAGIC = b"MBJR"
_SEGMENT_HEADER = struct.Struct("<8sQ")
_RECORD_HEADER = struct.Struct("<4sQIIH")
_HEADER_BYTES = 64
_ZERO_CHUNK = 1 << 20


class ReceiveJournal:
    """The journal in ``folder``; ``open()`` before use, ``close()`` after. Thread-safe."""

    def __init__(self, folder: Path, segment_bytes: int = 64 << 20, *, name: str = "receive") -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.path = folder / f"{name}.journal"  # one writer process per journal file
        self._fd = -1
        self._file_bytes = segment_bytes
        self._generation = 0
        self._offset = _HEADER_BYTES
        self._written = 0  # bytes ever appended (monotonic): what a sync must cover
        self._synced = 0
        self._lock = threading.Lock()  # reservation and write of a record, rotation
        self._sync_lock = threading.Lock()
        self._drained = threading.Condition()  # guards _in_flight: records whose files are not placed yet
        self._in_flight = 0
        self._syncfs, self._start_writeback = _linux_functions()

    def siblings(self) -> list[ReceiveJournal]:
        """The other journals in the folder (other listener processes'), as journals of this size."""
        return [ReceiveJournal(self.folder, self.segment_bytes, name=path.stem)
                for path in sorted(self.folder.glob("*.journal")) if path != self.path]

    def largest_record(self) -> int:
        """Instances above this size are written durably on their own instead (a journal sized for
        thousands of ordinary instances should not be recycled for one huge one)."""
        return self.segment_bytes // 8

    def open(self) -> Iterator[tuple[str, bytes]]:
        """Open (creating and zero-filling on first use) and yield the records a previous run left
        unchecked, oldest first, as (relative path, Part 10 bytes). The caller restores them, then
        calls :meth:`checkpoint`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = self.path.stat().st_size if self.path.exists() else 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if existing < _HEADER_BYTES:
            self._zero_fill(0)
            self._start_generation(1)
            return iter(())
        magic, generation = _SEGMENT_HEADER.unpack(os.pread(self._fd, _SEGMENT_HEADER.size, 0))
        if magic == bytes(len(_SEGMENT_MAGIC)):
            # stopped while zero-filling: the header comes last, so nothing was ever journaled here
            self._zero_fill(0)
            self._start_generation(1)
            return iter(())
        if magic != _SEGMENT_MAGIC:
            raise RuntimeError(f"{self.path} is not a MedBridge receive journal; move it away and restart")
        # replayed at the size it was written with; resized (MEDBRIDGE_DICOM_JOURNAL_BYTES changed) at the checkpoint
        self._file_bytes = existing
        self._generation = generation
        return self._records(generation)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @contextmanager
    def covering(self, relative_path: str, payload: bytes) -> Iterator[Callable[[], None]]:
        """Journal ``payload`` under ``relative_path``; the block gets ``durable()``, which returns
        once the record is on stable storage. The caller places the file and commits its row inside
        the block, calling ``durable()`` before the commit: the record's writeback starts on entry,
        so work done before ``durable()`` (the row's insert) overlaps the disk write. A checkpoint
        waits for open blocks: it may drop a record only once its file is in place to be synced."""
        end = self._append(relative_path, payload)
        try:
            yield lambda: self._sync(end)
        finally:
            with self._drained:
                self._in_flight -= 1
                self._drained.notify_all()

    def _append(self, relative_path: str, payload: bytes) -> int:
        """Write the record and start its writeback; the running total that :meth:`_sync` must reach."""
        name = relative_path.encode("utf-8")
        size = _RECORD_HEADER.size + len(name) + len(payload)
        with self._lock:
            if self._offset + size > self._file_bytes:
                self._recycle()
            header = _RECORD_HEADER.pack(_RECORD_MAGIC, self._generation, len(payload), zlib.crc32(payload), len(name))
            os.pwrite(self._fd, b"".join((header, name, payload)), self._offset)
            if self._start_writeback is not None:
                self._start_writeback(self._fd, self._offset, size, _SYNC_FILE_RANGE_WRITE)
            self._offset += size
            self._written += size
            with self._drained:
                self._in_flight += 1
            return self._written

    def _sync(self, end: int) -> None:
        """Return once every byte appended up to ``end`` is on stable storage (group commit)."""
        with self._sync_lock:
            if self._synced >= end:
                return  # another writer's sync, begun after our write, covered it
            target = self._written
            os.fdatasync(self._fd)
            self._synced = target

    def checkpoint(self) -> None:
        """Sync everything written since the last checkpoint, then start the segment afresh."""
        with self._lock:
            self._recycle()

    # ---- internals ---------------------------------------------------------------------------
    def _recycle(self) -> None:
        """Under ``_lock``: once the writers inside ``covering`` have placed their files, those
        files are synced, so the records can go."""
        with self._drained:
            while self._in_flight:
                self._drained.wait()
        self._sync_file_system()
        if self._file_bytes != self.segment_bytes:
            os.ftruncate(self._fd, min(self._file_bytes, self.segment_bytes))
            self._zero_fill(min(self._file_bytes, self.segment_bytes))
            self._file_bytes = self.segment_bytes
        self._start_generation(self._generation + 1)

    def _start_generation(self, generation: int) -> None:
        os.pwrite(self._fd, _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, generation).ljust(_HEADER_BYTES, b"\0"), 0)
        os.fdatasync(self._fd)
        self._generation = generation
        self._offset = _HEADER_BYTES

    def _sync_file_system(self) -> None:
        if self._syncfs is None or self._syncfs(self._fd) != 0:
            os.sync()

    def _zero_fill(self, start: int) -> None:
        """Zeros from ``start`` to the segment size. Written blocks, not fallocate's unwritten
        extents: a later overwrite then changes no metadata, so fdatasync flushes data alone
        (~2x cheaper than a sync that converts extents)."""
        chunk = bytes(_ZERO_CHUNK)
        for offset in range(start, self.segment_bytes, _ZERO_CHUNK):
            os.pwrite(self._fd, chunk[: min(_ZERO_CHUNK, self.segment_bytes - offset)], offset)
        os.fsync(self._fd)

    def _records(self, generation: int) -> Iterator[tuple[str, bytes]]:
        offset = _HEADER_BYTES
        while offset + _RECORD_HEADER.size <= self._file_bytes:
            magic, gen, length, crc, name_length = _RECORD_HEADER.unpack(
                os.pread(self._fd, _RECORD_HEADER.size, offset))
            if magic != _RECORD_MAGIC or gen != generation:
                break
            start = offset + _RECORD_HEADER.size
            body = os.pread(self._fd, name_length + length, start)
            payload = body[name_length:]
            if len(payload) != length or zlib.crc32(payload) != crc:
                break  # the torn tail of a crash: never acknowledged
            yield body[:name_length].decode("utf-8"), payload
            offset = start + name_length + length
        self._offset = offset


_SYNC_FILE_RANGE_WRITE = 2


def _linux_functions() -> tuple[Callable[[int], int] | None, Callable[[int, int, int, int], int] | None]:
    """Linux ``syncfs(2)`` (syncs only the journal's file system; ``os.sync`` elsewhere) and
    ``sync_file_range(2)`` (starts a record's writeback without waiting; skipped elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        syncfs, writeback = libc.syncfs, libc.sync_file_range
    except (OSError, AttributeError):
        return None, None
    writeback.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return syncfs, writeback
