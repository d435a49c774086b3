"""Replay: what dead processes' journals prove, and adopting them for recovery.

An attempt that is not applied is ``replied`` (every delivery has a reply) or
``unanswered`` (some have none: those become ``uncertain``; the replies it has are
applied). Adoption locks every dead owner's segments, so that two recoveries never
apply the same journal, and ``commit`` deletes them once the store holds their outcomes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from mta.journal.files import fsync_directory, lock_owner, segments_by_owner
from mta.journal.records import DotPending, JournalCorrupt, ReplyReceived, read_segment

#: Where unreadable segments are kept, inside the journal directory.
UNREADABLE_DIR = "unreadable"
#: Bytes of an unreadable journal kept in the store's set-aside record.
MAX_UNREADABLE_RAW = 8 * 1024 * 1024


@dataclass(frozen=True)
class PendingAttempt:
    """An attempt not yet applied to the store, with the replies it got."""

    owner: str
    dot: DotPending
    replies: tuple[ReplyReceived, ...]

    @property
    def missing(self) -> tuple[int, ...]:
        """Deliveries without a reply: they become ``uncertain``."""
        replied = {reply.delivery_id for reply in self.replies}
        return tuple(d for d in self.dot.delivery_ids if d not in replied)


@dataclass(frozen=True)
class ReplayResult:
    """Unapplied attempts: all deliveries replied, or some unanswered."""

    replied: tuple[PendingAttempt, ...] = ()
    unanswered: tuple[PendingAttempt, ...] = ()


def replay(owner: str, paths: list[Path]) -> ReplayResult:
    """Classify the attempts in one owner's segments, given oldest first."""
    pending: dict[str, DotPending] = {}
    replies: dict[str, dict[int, ReplyReceived]] = {}
    applied: set[str] = set()
    for path in paths:
        for record in read_segment(path):
            if isinstance(record, DotPending):
                pending[record.attempt_id] = record
            elif isinstance(record, ReplyReceived):
                replies.setdefault(record.attempt_id, {})[record.delivery_id] = record
            else:
                applied.add(record.attempt_id)
    orphans = set(replies) - set(pending) - applied
    if orphans:
        raise JournalCorrupt(f"{owner}: replies without a dot-pending record: {sorted(orphans)}")
    replied: list[PendingAttempt] = []
    unanswered: list[PendingAttempt] = []
    for attempt_id, dot in pending.items():
        if attempt_id in applied:
            continue
        attempt = PendingAttempt(owner, dot, tuple(replies.get(attempt_id, {}).values()))
        (unanswered if attempt.missing else replied).append(attempt)
    return ReplayResult(tuple(replied), tuple(unanswered))


def _merge(results: list[ReplayResult]) -> ReplayResult:
    return ReplayResult(tuple(a for r in results for a in r.replied),
                        tuple(a for r in results for a in r.unanswered))


@dataclass(frozen=True)
class Unreadable:
    """A dead owner's journal that cannot be read: its evidence is missing (I3)."""

    owner: str
    error: str
    paths: tuple[Path, ...]

    def raw(self, limit: int = MAX_UNREADABLE_RAW) -> bytes:
        """The segments' bytes as they are on disk (at most ``limit``), for the operator."""
        data = b"".join(path.read_bytes() for path in self.paths)
        return data[:limit]


class Adoption:
    """Dead owners' segments, locked until closed; ``commit`` deletes them, and moves
    unreadable ones to ``unreadable/`` (kept for the operator, never read again)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._locks: list[int] = []
        self._paths: list[Path] = []
        results: list[ReplayResult] = []
        #: Dead owners whose journal could not be read, by owner.
        self.unreadable: dict[str, Unreadable] = {}
        try:
            for owner in segments_by_owner(directory):
                fd = lock_owner(directory, owner)
                if fd is None:
                    continue
                self._locks.append(fd)
                # Listed again under the lock: an adopter that ran meanwhile deleted them.
                paths = [path for _, path in segments_by_owner(directory).get(owner, [])]
                try:
                    results.append(replay(owner, paths))
                except (JournalCorrupt, OSError) as exc:
                    self.unreadable[owner] = Unreadable(owner, str(exc), tuple(paths))
                    continue
                self._paths += paths
        except BaseException:
            self.close()
            raise
        self.pending = _merge(results)

    def commit(self) -> None:
        """Delete the adopted segments: call once ``pending`` is applied to the store."""
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths = []
        if self.unreadable:
            aside = self._directory / UNREADABLE_DIR
            aside.mkdir(exist_ok=True)
            for journal in self.unreadable.values():
                for path in journal.paths:
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(path, aside / path.name)
            fsync_directory(aside, os.fsync)
        fsync_directory(self._directory, os.fsync)

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
    fd = lock_owner(directory, owner)
    if fd is None:
        return True
    os.close(fd)
    return False


def adopt(directory: Path) -> Adoption:
    """Lock and replay the segments of every owner whose process is gone."""
    return Adoption(directory)
