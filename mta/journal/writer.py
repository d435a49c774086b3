"""The local append-only delivery journal: evidence for invariant I3.

Each node process owns one journal in the node's journal directory: segments
``<owner>.<seq>.jrnl`` and a lock file ``<owner>.lock`` that it holds with an exclusive
``flock`` while it lives, so others can tell live journals from dead ones. Records
(``records.py``):

    DotPending       durable right before the final dot of DATA is written
    ReplyReceived    durable before the store is updated (one per delivery)
    Applied          the store update for the attempt committed; lazy

API::

    journal = Journal.open(directory, owner)     # takes the lock, starts a new segment
    await journal.append_durable(record)         # returns once fsynced (group commit)
    journal.append(Applied(...))                 # written now, fsynced by the next flush
    await journal.flush(); await journal.close()

    with adopt(directory) as adoption:           # dead owners' segments (replay.py)
        apply(adoption.pending)                  # to the store, idempotently
        adoption.commit()                        # deletes the adopted segments

Owners are unique per process start (``mta.delivery.owner``): a journal never reopens
an owner's old segments; they are a dead owner's, for adoption.

Concurrent ``append_durable`` callers share one fsync: the first starts a round in a
thread, the others wait for it or for the next one. ``append`` survives a process crash
(the write reached the kernel) but not a power loss until the next round; a lost
``Applied`` only makes replay apply a reply again, so applying must be idempotent
(guarded transitions).

Disk is bounded: a segment is rotated past ``segment_bytes``; the oldest segments whose
attempts are all durably applied are deleted, oldest first. When ``max_segments`` are
still needed, ``DotPending`` raises ``JournalFull`` (the attempt stops before its dot); replies and
``Applied`` are always written. After a failed write or fsync the journal refuses every
append (``JournalFailed``): the kernel may have dropped the unwritten pages.

A torn or corrupt last line of a segment (a crash mid-write) is ignored; corruption
anywhere else raises ``JournalCorrupt``. Opening and replay do blocking file I/O: call
them at start, or through ``asyncio.to_thread``. Attempt ids must be unique.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mta.faults import fault_error, fault_point
from mta.journal.files import OWNER_NAME, fsync_directory, lock_owner, segments_by_owner
from mta.journal.records import (
    Applied,
    DotPending,
    JournalError,
    JournalFailed,
    JournalFull,
    JournalLocked,
    Record,
    encode,
)

MiB = 1024 * 1024


@dataclass
class _Segment:
    seq: int
    path: Path
    attempts: set[str] = field(default_factory=set)
    size: int = 0


class Journal:
    """One process's journal: appends, group-committed fsyncs, rotation and cleanup."""

    def __init__(self, directory: Path, owner: str, lock_fd: int, *, segment_bytes: int,
                 max_segments: int, fsync: Callable[[int], None]) -> None:
        self.directory = directory
        self.owner = owner
        self._lock_fd = lock_fd
        self._segment_bytes = segment_bytes
        self._max_segments = max_segments
        self._fsync = fsync
        self._segments: list[_Segment] = []
        self._refs: dict[str, int] = {}  # attempt id -> segments that mention it
        self._applied_at: dict[str, int] = {}  # attempt id -> number of its Applied record
        self._written = 0  # records handed to the kernel
        self._synced = 0  # records known to be on disk
        self._retired: list[int] = []  # rotated-out descriptors awaiting their last fsync
        self._directory_dirty = False
        self._round: asyncio.Future[None] | None = None
        self._failed: BaseException | None = None
        self._fd = -1
        self._size = 0

    @classmethod
    def open(cls, directory: Path, owner: str, *, segment_bytes: int = 8 * MiB,
             max_segments: int = 128,
             fsync: Callable[[int], None] = os.fsync) -> Journal:
        """Lock ``owner`` and start its first segment."""
        if not OWNER_NAME.fullmatch(owner):
            raise ValueError(f"journal owner must match {OWNER_NAME.pattern}: {owner!r}")
        if segment_bytes < 1 or max_segments < 2:
            raise ValueError("segment_bytes must be positive and max_segments at least 2")
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = lock_owner(directory, owner)
        if lock_fd is None:
            raise JournalLocked(f"journal {owner!r} in {directory} is held by a live process")
        try:
            if owner in segments_by_owner(directory):
                raise JournalError(f"journal {owner!r} in {directory} has segments of an "
                                   "earlier process: owners are unique, adopt them instead")
            journal = cls(directory, owner, lock_fd, segment_bytes=segment_bytes,
                          max_segments=max_segments, fsync=fsync)
            journal._start_segment()
        except BaseException:
            os.close(lock_fd)
            raise
        return journal

    def _index(self, segment: _Segment, record: Record, number: int) -> None:
        if record.attempt_id not in segment.attempts:
            segment.attempts.add(record.attempt_id)
            self._refs[record.attempt_id] = self._refs.get(record.attempt_id, 0) + 1
        if isinstance(record, Applied):
            self._applied_at[record.attempt_id] = number

    def _start_segment(self) -> None:
        seq = self._segments[-1].seq + 1 if self._segments else 1
        path = self.directory / f"{self.owner}.{seq:08d}.jrnl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o644)
        if self._fd >= 0:
            self._retired.append(self._fd)
        self._fd, self._size = fd, 0
        self._segments.append(_Segment(seq, path))
        self._directory_dirty = True

    def append(self, record: Record) -> None:
        """Write ``record`` now; it is durable after the next fsync round."""
        if self._failed is not None:
            raise JournalFailed(f"journal {self.owner!r} failed earlier") from self._failed
        line = encode(record)
        if self._size and self._size + len(line) > self._segment_bytes:
            self._collect()
            if isinstance(record, DotPending) and len(self._segments) >= self._max_segments:
                raise JournalFull(f"journal {self.owner!r}: {len(self._segments)} segments "
                                  "still hold unapplied attempts")
            self._start_segment()
        view = memoryview(line)
        try:
            fault_error("journal.write")
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._failed = exc
            raise JournalFailed(f"journal {self.owner!r}: write failed: {exc}") from exc
        self._size += len(line)
        self._segments[-1].size += len(line)
        self._written += 1
        self._index(self._segments[-1], record, self._written)

    @property
    def backlog(self) -> int:
        """Attempts in this journal whose outcomes the store has not taken yet."""
        return len(self._refs) - len(self._applied_at)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segments this journal keeps on disk (rotation deletes the rest)."""
        return sum(segment.size for segment in self._segments)

    @property
    def failed(self) -> BaseException | None:
        """The write or fsync error that stopped the journal, or None while it works."""
        return self._failed

    def resume(self) -> bool:
        """After a failure, go on in a fresh segment; True when appends work again.

        What reached the disk before the failure stays in the failed segment (a torn last
        line there is tolerated); records written but never synced were never
        acknowledged, so no one waits for them any more.
        """
        if self._failed is None:
            return True
        if self._round is not None:
            return False
        failed_fd = self._fd
        try:
            fault_error("journal.write")
            self._fd = -1
            self._start_segment()
        except OSError:
            self._fd = failed_fd
            return False
        try:
            fsync_directory(self.directory, self._fsync)
        except OSError:
            fresh = self._segments.pop()
            with contextlib.suppress(OSError):
                os.close(self._fd)
            fresh.path.unlink(missing_ok=True)
            self._fd = failed_fd
            return False
        for fd in [failed_fd, *self._retired]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._retired, self._directory_dirty = [], False
        self._synced = self._written
        self._failed = None
        return True

    async def append_durable(self, record: Record) -> None:
        """Write ``record`` and return once it is fsynced, sharing the fsync with others."""
        try:
            self.append(record)
        except JournalFull:
            await self.flush()  # lazily written Applied records may free old segments
            self.append(record)
        await self._sync_to(self._written)
        fault_point("journal.after_append")

    async def flush(self) -> None:
        """Return once everything written so far is fsynced."""
        await self._sync_to(self._written)

    async def _sync_to(self, target: int) -> None:
        while self._synced < target:
            if self._failed is not None:
                raise JournalFailed(f"journal {self.owner!r} failed earlier") from self._failed
            if self._round is None:
                self._round = asyncio.ensure_future(self._sync_round())
            await asyncio.shield(self._round)

    async def _sync_round(self) -> None:
        """Fsync every record written so far: one round covers all waiting callers."""
        upto = self._written
        retired, self._retired = self._retired, []
        directory_dirty, self._directory_dirty = self._directory_dirty, False
        try:
            fault_point("journal.before_fsync")
            await asyncio.to_thread(self._fsync_files, self._fd, retired, directory_dirty)
        except OSError as exc:
            self._failed = exc
            raise JournalFailed(f"journal {self.owner!r}: fsync failed: {exc}") from exc
        finally:
            self._round = None
        self._synced = upto
        self._collect()

    def _fsync_files(self, fd: int, retired: list[int], directory_dirty: bool) -> None:
        for old in retired:
            self._fsync(old)
            os.close(old)
        self._fsync(fd)
        if directory_dirty:
            fsync_directory(self.directory, self._fsync)

    def _collect(self) -> None:
        """Delete the oldest segments whose attempts are all durably applied."""
        while len(self._segments) > 1 and all(
            self._applied_at.get(attempt, self._synced + 1) <= self._synced
            for attempt in self._segments[0].attempts
        ):
            segment = self._segments.pop(0)
            segment.path.unlink(missing_ok=True)
            for attempt in segment.attempts:
                self._refs[attempt] -= 1
                if not self._refs[attempt]:
                    del self._refs[attempt]
                    self._applied_at.pop(attempt, None)

    async def close(self) -> None:
        """Fsync what was written, then close the segment and release the lock."""
        try:
            if self._failed is None:
                await self.flush()
        finally:
            for fd in [*self._retired, self._fd]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._retired, self._fd = [], -1
            os.close(self._lock_fd)

