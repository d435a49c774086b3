"""The local append-only delivery journal: evidence for invariant I3.

Each node process owns one journal in the node's journal directory: segments
``<owner>.<seq>.jrnl`` and a lock file ``<owner>.lock`` that it holds with an exclusive
``flock`` while it lives, so others can tell live journals from dead ones. A line is
``<crc32 hex> <json>\\n``. Records:

    AttemptStarted   durable before the message data is sent
    ReplyReceived    durable before the store is updated (one per delivery)
    Applied          the store update for the attempt committed; lazy

API::

    journal = Journal.open(directory, owner)     # takes the lock, starts a new segment
    journal.recovered                            # own previous segments' pending attempts:
                                                 # apply them, then append Applied for each
    await journal.append_durable(record)         # returns once fsynced (group commit)
    journal.append(Applied(...))                 # written now, fsynced by the next flush
    await journal.flush(); await journal.close()

    pending(directory) -> ReplayResult           # dead owners' attempts, read-only
    with adopt(directory) as adoption:           # dead owners' segments, locked
        apply(adoption.pending)                  # to the store, idempotently
        adoption.commit()                        # deletes the adopted segments

Concurrent ``append_durable`` callers share one fsync: the first starts a round in a
thread, the others wait for it or for the next one. ``append`` survives a process crash
(the write reached the kernel) but not a power loss until the next round; a lost
``Applied`` only makes replay apply a reply again, so applying must be idempotent
(guarded transitions). Replay classifies an attempt that is not applied as ``replied``
(every delivery has a reply) or ``unanswered`` (some have none: those become
``uncertain``; the replies it has are applied).

Disk is bounded: a segment is rotated past ``segment_bytes``; the oldest segments whose
attempts are all durably applied are deleted, oldest first. When ``max_segments`` are
still needed, ``AttemptStarted`` raises ``JournalFull`` (workers pause); replies and
``Applied`` are always written. After a failed write or fsync the journal refuses every
append (``JournalFailed``): the kernel may have dropped the unwritten pages.

A torn or corrupt last line of a segment (a crash mid-write) is ignored; corruption
anywhere else raises ``JournalCorrupt``. Opening and replay do blocking file I/O: call
them at start, or through ``asyncio.to_thread``. Attempt ids must be unique.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from mta.errors import MtaError
from mta.faults import fault_point

MiB = 1024 * 1024
_OWNER = re.compile(r"[A-Za-z0-9_-]+")
_SEGMENT = re.compile(r"(?P<owner>[A-Za-z0-9_-]+)\.(?P<seq>[0-9]+)\.jrnl")


class JournalError(MtaError):
    """Base of the journal's errors."""


class JournalCorrupt(JournalError):
    """A line other than a segment's last one fails its checksum or does not parse."""


class JournalLocked(JournalError):
    """Another live process holds the owner's lock."""


class JournalFull(JournalError):
    """``max_segments`` segments still hold unapplied attempts; start no new attempt."""


class JournalFailed(JournalError):
    """A write or fsync failed earlier; nothing more is accepted."""


@dataclass(frozen=True)
class AttemptStarted:
    """An SMTP transaction for these deliveries is about to send the message data."""

    attempt_id: str
    delivery_ids: tuple[int, ...]
    message_id: str
    host: str
    at: float


@dataclass(frozen=True)
class ReplyReceived:
    """The peer's reply for one delivery; code 0 means a network error (text says which)."""

    attempt_id: str
    delivery_id: int
    code: int
    text: str
    data_sent: bool
    at: float


@dataclass(frozen=True)
class Applied:
    """The store update for the attempt committed."""

    attempt_id: str
    at: float


Record = AttemptStarted | ReplyReceived | Applied
_TAGS: dict[str, type[Record]] = {"started": AttemptStarted, "reply": ReplyReceived,
                                  "applied": Applied}
_TAG_OF = {cls: tag for tag, cls in _TAGS.items()}


def encode(record: Record) -> bytes:
    """One journal line: CRC32 of the JSON payload, a space, the payload, a newline."""
    payload = json.dumps({"t": _TAG_OF[type(record)], **dataclasses.asdict(record)},
                         separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> Record:
    """Parse one line (without its newline); ``ValueError`` when it is not intact."""
    crc, sep, payload = line.partition(b" ")
    try:
        if not sep or len(crc) != 8 or int(crc, 16) != zlib.crc32(payload):
            raise ValueError("checksum mismatch")
        fields: dict[str, Any] = json.loads(payload)
        cls = _TAGS[fields.pop("t")]
        if cls is AttemptStarted:
            fields["delivery_ids"] = tuple(fields["delivery_ids"])
        return cls(**fields)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"malformed record: {exc!r}") from exc


def read_segment(path: Path) -> list[Record]:
    """The records of one segment; a bad last line is a torn write and is dropped."""
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    records: list[Record] = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(decode(line))
        except ValueError as exc:
            if number == len(lines):
                break
            raise JournalCorrupt(f"{path}: line {number}: {exc}") from exc
    return records


@dataclass(frozen=True)
class PendingAttempt:
    """An attempt not yet applied to the store, with the replies it got."""

    owner: str
    started: AttemptStarted
    replies: tuple[ReplyReceived, ...]

    @property
    def missing(self) -> tuple[int, ...]:
        """Deliveries without a reply: they become ``uncertain``."""
        replied = {reply.delivery_id for reply in self.replies}
        return tuple(d for d in self.started.delivery_ids if d not in replied)


@dataclass(frozen=True)
class ReplayResult:
    """Unapplied attempts: all deliveries replied, or some unanswered."""

    replied: tuple[PendingAttempt, ...] = ()
    unanswered: tuple[PendingAttempt, ...] = ()


def replay(owner: str, paths: list[Path]) -> ReplayResult:
    """Classify the attempts in one owner's segments, given oldest first."""
    started: dict[str, AttemptStarted] = {}
    replies: dict[str, dict[int, ReplyReceived]] = {}
    applied: set[str] = set()
    for path in paths:
        for record in read_segment(path):
            if isinstance(record, AttemptStarted):
                started[record.attempt_id] = record
            elif isinstance(record, ReplyReceived):
                replies.setdefault(record.attempt_id, {})[record.delivery_id] = record
            else:
                applied.add(record.attempt_id)
    orphans = set(replies) - set(started) - applied
    if orphans:
        raise JournalCorrupt(f"{owner}: replies without a started attempt: {sorted(orphans)}")
    replied: list[PendingAttempt] = []
    unanswered: list[PendingAttempt] = []
    for attempt_id, start in started.items():
        if attempt_id in applied:
            continue
        attempt = PendingAttempt(owner, start, tuple(replies.get(attempt_id, {}).values()))
        (unanswered if attempt.missing else replied).append(attempt)
    return ReplayResult(tuple(replied), tuple(unanswered))


def _merge(results: list[ReplayResult]) -> ReplayResult:
    return ReplayResult(tuple(a for r in results for a in r.replied),
                        tuple(a for r in results for a in r.unanswered))


def _segments(directory: Path) -> dict[str, list[tuple[int, Path]]]:
    """Segments by owner, oldest first."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in directory.iterdir():
        match = _SEGMENT.fullmatch(path.name)
        if match:
            found.setdefault(match["owner"], []).append((int(match["seq"]), path))
    return {owner: sorted(segments) for owner, segments in found.items()}


def _lock(directory: Path, owner: str) -> int | None:
    """The owner's lock file descriptor, or None when a live process holds the lock."""
    fd = os.open(directory / f"{owner}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _fsync_directory(directory: Path, fsync: Callable[[int], None]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class Adoption:
    """Dead owners' segments, locked until closed; ``commit`` deletes them."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._locks: list[int] = []
        self._paths: list[Path] = []
        results: list[ReplayResult] = []
        try:
            for owner in _segments(directory):
                fd = _lock(directory, owner)
                if fd is None:
                    continue
                self._locks.append(fd)
                # Listed again under the lock: an adopter that ran meanwhile deleted them.
                paths = [path for _, path in _segments(directory).get(owner, [])]
                self._paths += paths
                results.append(replay(owner, paths))
        except BaseException:
            self.close()
            raise
        self.pending = _merge(results)

    def commit(self) -> None:
        """Delete the adopted segments: call once ``pending`` is applied to the store."""
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths = []
        _fsync_directory(self._directory, os.fsync)

    def close(self) -> None:
        """Release the dead owners' locks (lock files stay: deleting them would race)."""
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def __enter__(self) -> Adoption:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def owner_alive(directory: Path, owner: str) -> bool:
    """True while a process holds ``owner``'s journal lock in ``directory``."""
    if not (directory / f"{owner}.lock").exists():
        return False
    fd = _lock(directory, owner)
    if fd is None:
        return True
    os.close(fd)
    return False


def adopt(directory: Path) -> Adoption:
    """Lock and replay the segments of every owner whose process is gone."""
    return Adoption(directory)


def pending(directory: Path) -> ReplayResult:
    """The unapplied attempts of dead owners, without adopting them."""
    with adopt(directory) as adoption:
        return adoption.pending


@dataclass
class _Segment:
    seq: int
    path: Path
    attempts: set[str] = field(default_factory=set)


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
        self.recovered = ReplayResult()

    @classmethod
    def open(cls, directory: Path, owner: str, *, segment_bytes: int = 8 * MiB,
             max_segments: int = 128,
             fsync: Callable[[int], None] = os.fsync) -> Journal:
        """Lock ``owner``, load its previous segments and start a new segment."""
        if not _OWNER.fullmatch(owner):
            raise ValueError(f"journal owner must match {_OWNER.pattern}: {owner!r}")
        if segment_bytes < 1 or max_segments < 2:
            raise ValueError("segment_bytes must be positive and max_segments at least 2")
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(directory, owner)
        if lock_fd is None:
            raise JournalLocked(f"journal {owner!r} in {directory} is held by a live process")
        journal = cls(directory, owner, lock_fd, segment_bytes=segment_bytes,
                      max_segments=max_segments, fsync=fsync)
        try:
            journal._load(_segments(directory).get(owner, []))
            journal._start_segment()
        except BaseException:
            os.close(lock_fd)
            raise
        return journal

    def _load(self, previous: list[tuple[int, Path]]) -> None:
        """Index the previous incarnation's segments; make them durable before relying on them."""
        for seq, path in previous:
            fd = os.open(path, os.O_RDONLY)
            try:
                self._fsync(fd)
            finally:
                os.close(fd)
            segment = _Segment(seq, path)
            self._segments.append(segment)
            for record in read_segment(path):
                self._index(segment, record, 0)
        self.recovered = replay(self.owner, [path for _, path in previous])

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
            if isinstance(record, AttemptStarted) and len(self._segments) >= self._max_segments:
                raise JournalFull(f"journal {self.owner!r}: {len(self._segments)} segments "
                                  "still hold unapplied attempts")
            self._start_segment()
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._failed = exc
            raise JournalFailed(f"journal {self.owner!r}: write failed: {exc}") from exc
        self._size += len(line)
        self._written += 1
        self._index(self._segments[-1], record, self._written)

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
            _fsync_directory(self.directory, self._fsync)

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

    @property
    def segment_paths(self) -> list[Path]:
        """The segments still on disk, oldest first."""
        return [segment.path for segment in self._segments]

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

