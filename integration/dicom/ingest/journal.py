"""A write-ahead journal that makes a received instance durable with one sync into preallocated space.

A C-STORE may be answered only once its instance survives a power cut. Writing it as its own file
durably takes two syncs (the file, then its folder for the rename): ~0.75 ms here, the largest cost
of a C-STORE once the protocol is fast. Appending it to a journal segment whose blocks are already
allocated and written takes one ``fdatasync`` of data only (~0.25 ms: no metadata changes). The
instance file is then written and renamed into place *without* syncs; the journal covers it until
the next checkpoint, which syncs the file system once (``syncfs``) and recycles the segment.

A syncer thread issues the ``fdatasync`` as soon as a record is appended, so the disk's cache flush
runs while the appending thread writes the instance file; one sync covers every record appended
before it began, so concurrent associations share syncs (group commit). A checkpoint waits until
every journaled instance is in place (``covering``, or ``append`` until the record is settled), so
the sync it does covers them all.

Layout: one segment file of ``segment_bytes``, zero-filled once when created. A 64-byte header holds
the magic and the segment's generation; records follow: magic, generation, payload length, CRC-32,
name length, the file's path relative to the storage folder, and the Part 10 bytes. Replay reads
records of the current generation until the first header that does not check out (an older
generation's leftovers, or zeros), so a recycled segment is never zeroed again. A record whose
payload fails its CRC is skipped, not the end: it is the torn tail of a crash (never acknowledged)
or a damaged block, and the records after it are still good.

One process writes a journal: it holds an exclusive ``flock`` on the file while open, so a second
listener process or a second MedBridge on the same volume gets an error naming the file instead of
appending to (or replaying, then recycling) records that are not its own. A failed sync, of a record
or of a checkpoint, keeps every record and is reported by :meth:`ReceiveJournal.failure` (a failed
checkpoint until one succeeds; a failed record sync until a restart: after a failed ``fdatasync``
nothing written since can be trusted, so ingest stays refused until a restart replays the journal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from integration.datadir import private_folder
from integration.observability import metrics
from integration.phi import uid_hash

log = logging.getLogger(__name__)

_SEGMENT_MAGIC = b"MBJSEG01"
_RECORD_MAGIC = b"MBJR"
_SEGMENT_HEADER = struct.Struct("<8sQ")
_RECORD_HEADER = struct.Struct("<4sQIIH")
_HEADER_BYTES = 64
_ZERO_CHUNK = 1 << 20


class ReceiveJournal:
    """The journal in ``folder``; ``open()`` before use, ``close()`` after. Thread-safe."""

    def __init__(self, folder: Path, segment_bytes: int = 64 << 20, *, name: str = "receive",
                 syncfs: Callable[[int], int] | None | bool = True) -> None:
        """``syncfs``: how a checkpoint syncs the file system (``True``: Linux ``syncfs(2)`` where
        there is one, else ``os.sync``; a callable returning 0, or -1 with errno set, as syncfs does)."""
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
        self._sync_state = threading.Lock()  # guards _written, _synced, _sync_error, _stopping
        self._sync_requested = threading.Condition(self._sync_state)  # wakes the syncer
        self._sync_done = threading.Condition(self._sync_state)  # wakes those waiting in durable()
        self._sync_begun = threading.Condition(self._sync_state)  # wakes appenders handing the GIL over
        self._flushing = False  # the syncer is inside fdatasync
        self._flush_target = 0  # bytes covered by the fdatasync begun last
        self._sync_error: OSError | None = None
        self._stopping = False
        self._syncer: threading.Thread | None = None
        self._drained = threading.Condition()  # guards _in_flight: records whose files are not placed yet
        self._in_flight = 0
        self._syncfs = _linux_syncfs() if syncfs is True else (syncfs or None)
        self._checkpoint_error: str | None = None
        self.skipped = 0  # records a replay skipped (payload failing its CRC)
        # settles records whose rows are still to be written (True once none is left); see _recycle
        self.before_recycle: Callable[[], bool] | None = None

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
        if self._fd >= 0:
            self.close()  # opened again (replayed once more): one descriptor, one lock
        private_folder(self.folder)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalInUseError(
                f"the receive journal {self.path} is open in another process (another DICOM listener process, "
                "or another MedBridge on the same data folder); give each MedBridge its own MEDBRIDGE_DATA_DIR, "
                "or stop the other one first") from None
        existing = os.fstat(fd).st_size
        self._fd = fd
        self._stopping = False
        self._syncer = threading.Thread(target=self._run_syncer, args=(self._fd,), name="ReceiveJournalSync",
                                        daemon=True)
        self._syncer.start()
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

    def fill(self) -> float:
        """How full the segment is (0..1) since its last checkpoint: near 1, the next append checkpoints."""
        return min(1.0, self._offset / self.segment_bytes) if self.segment_bytes else 0.0

    def failure(self) -> str | None:
        """Why the journal cannot take instances now (a sync failed), or None."""
        with self._sync_state:
            if self._sync_error is not None:
                return f"receive journal sync failed ({self._sync_error}); restart MedBridge to replay the journal"
        return self._checkpoint_error

    def close(self) -> None:
        if self._syncer is not None:
            with self._sync_state:
                self._stopping = True
                self._sync_requested.notify()
            self._syncer.join()
            self._syncer = None
        if self._fd >= 0:
            os.close(self._fd)  # and with it the flock
            self._fd = -1

    @contextmanager
    def covering(self, relative_path: str, payload: bytes) -> Iterator[Callable[[], None]]:
        """Journal ``payload`` under ``relative_path``; the block gets ``durable()``, which returns
        once the record is on stable storage. The caller places the file and commits its row inside
        the block, calling ``durable()`` before the commit: the record's sync starts on entry, so
        work done before ``durable()`` (the row's insert) overlaps the disk write. A checkpoint
        waits for open blocks: it may drop a record only once its file is in place to be synced."""
        record = self.append(relative_path, payload)
        try:
            yield record.durable
        finally:
            record.settle()

    def append(self, relative_path: str, payload: bytes) -> JournalRecord:
        """Journal ``payload`` under ``relative_path`` and start its sync. The record holds
        checkpoints off until ``settle()``: call it once the file and its row are in place (whoever
        writes the row later, e.g. a batch, settles it then)."""
        return JournalRecord(self, self._append(relative_path, payload))

    def _settle(self) -> None:
        with self._drained:
            self._in_flight -= 1
            self._drained.notify_all()

    def _append(self, relative_path: str, payload: bytes) -> int:
        """Write the record and wake the syncer; the running total that :meth:`_sync` must reach."""
        name = relative_path.encode("utf-8")
        size = _RECORD_HEADER.size + len(name) + len(payload)
        with self._lock:
            if self._sync_error is not None:
                raise OSError(f"the receive journal could not be synced ({self._sync_error}); restart MedBridge")
            if self._offset + size > self._file_bytes:
                self._recycle()
            header = _RECORD_HEADER.pack(_RECORD_MAGIC, self._generation, len(payload), zlib.crc32(payload), len(name))
            os.pwrite(self._fd, b"".join((header, name, payload)), self._offset)
            self._offset += size
            with self._drained:
                self._in_flight += 1
            with self._sync_state:
                self._written += size
                written = self._written
                self._sync_requested.notify()
        self._hand_over_to_syncer(written)
        return written

    def _hand_over_to_syncer(self, written: int) -> None:
        """Wait (GIL released) until the syncer is inside an fdatasync, unless one is under way
        already. Woken while this thread runs pure Python (the scanner reads the instance next), the
        syncer would wait for the GIL until this thread's next blocking call, and the disk flush
        would not overlap that work at all (CPython hands the GIL over only every 5 ms)."""
        with self._sync_state:
            self._sync_begun.wait_for(lambda: self._flushing or self._flush_target >= written
                                      or self._sync_error is not None or self._stopping)

    def _sync(self, end: int) -> None:
        """Return once every byte appended up to ``end`` is on stable storage."""
        with self._sync_state:
            self._sync_done.wait_for(lambda: self._synced >= end or self._sync_error is not None)
            if self._synced < end:
                raise OSError(f"the receive journal could not be synced ({self._sync_error}); restart MedBridge")

    def _run_syncer(self, fd: int) -> None:
        """The syncer thread: one ``fdatasync`` as soon as anything is unsynced, covering every
        record appended before it began (group commit). It runs while the appending thread reads
        and places the instance, so a C-STORE rarely waits for the disk's cache flush."""
        while True:
            with self._sync_state:
                self._sync_requested.wait_for(lambda: self._written > self._synced or self._stopping)
                if self._written <= self._synced:
                    return  # stopping, with nothing left to sync
                target = self._written
                self._flushing, self._flush_target = True, target
                self._sync_begun.notify_all()
            began = time.perf_counter()
            try:
                os.fdatasync(fd)
            except OSError as exc:  # after a failed sync nothing written since can be trusted
                log.error("receive journal sync failed: %s", exc)
                with self._sync_state:
                    self._sync_error = exc
                    self._flushing = False
                    self._sync_done.notify_all()
                    self._sync_begun.notify_all()
                return
            metrics.DICOM_JOURNAL_SYNC_SECONDS.observe(time.perf_counter() - began)
            with self._sync_state:
                self._synced = max(self._synced, target)
                self._flushing = False
                self._sync_done.notify_all()

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
                if self.before_recycle is not None:
                    self._drained.release()  # the rows' writer settles records under _drained
                    try:
                        if not self.before_recycle():
                            raise OSError("the receive journal is full and its instances' rows cannot be written")
                    finally:
                        self._drained.acquire()
                if self._in_flight:
                    self._drained.wait(0.01)  # records of instances being placed right now
        try:
            self._sync_file_system()
        except OSError as exc:
            # the files these records cover may not be on disk: keep the records (the generation stays)
            self._checkpoint_error = f"receive journal checkpoint sync failed ({exc}); its records are kept"
            log.error("%s", self._checkpoint_error)
            raise
        self._checkpoint_error = None
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
        """syncfs(2), whose failure (EIO, ENOSPC on write-back) is an error: os.sync() reports none."""
        if self._syncfs is None:
            os.sync()
            return
        if self._syncfs(self._fd) != 0:
            code = ctypes.get_errno() or errno.EIO
            raise OSError(code, f"syncfs: {os.strerror(code)}")

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
            end = start + name_length + length
            if end > self._file_bytes:
                break  # a header no record of this size could have: not ours
            body = os.pread(self._fd, name_length + length, start)
            payload = body[name_length:]
            offset = end
            if len(payload) != length or zlib.crc32(payload) != crc:
                # a torn tail (never acknowledged) or a damaged block: this record is lost, the next ones are not
                self.skipped += 1
                log.warning("receive journal %s: the record at offset %d fails its CRC and is skipped (name %s)",
                          self.path.name, start - _RECORD_HEADER.size,
                          uid_hash(body[:name_length].decode("utf-8", "replace")))
                continue
            yield body[:name_length].decode("utf-8"), payload
        self._offset = offset


class JournalInUseError(RuntimeError):
    """Another process holds the journal file (its flock)."""


class JournalRecord:
    """One appended record: ``durable()`` returns once it is on stable storage (group commit);
    ``settle()`` (exactly once) says its file and row are in place, so a checkpoint may drop it."""

    __slots__ = ("_journal", "_end")

    def __init__(self, journal: ReceiveJournal, end: int) -> None:
        self._journal = journal
        self._end = end

    def durable(self) -> None:
        self._journal._sync(self._end)

    def is_durable(self) -> bool:
        """True once the record is on stable storage (without waiting)."""
        return self._journal._synced >= self._end

    def settle(self) -> None:
        self._journal._settle()


def _linux_syncfs() -> Callable[[int], int] | None:
    """Linux ``syncfs(2)``: syncs only the journal's file system (``os.sync`` elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None
