"""Where journals live on disk: segment names, owner locks, directory fsync."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

#: What an owner name may hold: it is part of file names.
OWNER_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SEGMENT = re.compile(r"(?P<owner>[A-Za-z0-9_-]+)\.(?P<seq>[0-9]+)\.jrnl")


def segments_by_owner(directory: Path) -> dict[str, list[tuple[int, Path]]]:
    """Segments by owner, oldest first."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in directory.iterdir():
        match = _SEGMENT.fullmatch(path.name)
        if match:
            found.setdefault(match["owner"], []).append((int(match["seq"]), path))
    return {owner: sorted(segments) for owner, segments in found.items()}


def lock_owner(directory: Path, owner: str) -> int | None:
    """The owner's lock file descriptor, or None when a live process holds the lock."""
    fd = os.open(directory / f"{owner}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


#: The file naming a journal directory: its identity outlives every owner in it.
IDENTITY_FILE = "identity"


def journal_identity(directory: Path) -> str:
    """The identity of the journal directory, made (durably) when it has none yet: a
    wiped or replaced directory gets a new one, so the store can tell (I3)."""
    path = directory / IDENTITY_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text(encoding="ascii").strip()
    directory.mkdir(parents=True, exist_ok=True)
    # Several processes of a node may start at once: each writes a candidate of its own,
    # and the first to link it into place wins; the others read the winner's.
    temporary = directory / f"{IDENTITY_FILE}.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        with temporary.open("w", encoding="ascii") as handle:
            handle.write(uuid.uuid4().hex + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(directory, os.fsync)
    return path.read_text(encoding="ascii").strip()


def lock_file_exists(directory: Path, owner: str) -> bool:
    """Whether ``owner`` ever had a journal in ``directory`` (lock files are never
    deleted; segments are, once applied)."""
    return (directory / f"{owner}.lock").exists()


def fsync_directory(directory: Path, fsync: Callable[[int], None]) -> None:
    """Make the directory's entries (created or deleted segments) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)
