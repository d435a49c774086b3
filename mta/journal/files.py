"""Where journals live on disk: segment names, owner locks, directory fsync."""

from __future__ import annotations

import fcntl
import os
import re
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


def fsync_directory(directory: Path, fsync: Callable[[int], None]) -> None:
    """Make the directory's entries (created or deleted segments) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)
