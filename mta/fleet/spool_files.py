"""The audit spool's file operations: locked, fsynced appends and reads (I9)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class SpoolError(Exception):
    """The spool file itself could not be read or written (not the database's fault)."""


@contextlib.contextmanager
def spool_io(path: Path) -> Iterator[None]:
    """File errors on ``path`` as :class:`SpoolError`."""
    try:
        yield
    except OSError as exc:
        raise SpoolError(f"{path}: {exc.strerror or exc}") from exc


def open_locked(path: Path, flags: int) -> int:
    """``path`` opened with ``flags`` under an exclusive lock (appends and the copy's
    truncation never interleave); closing the descriptor releases it."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append_lines(path: Path, lines: list[str]) -> None:
    """Append ``lines`` to ``path`` under its lock, fsynced (and its directory, when the
    file is new) before this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = open_locked(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, "".join(lines).encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
