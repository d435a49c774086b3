"""Looking at journals from outside: what dead owners left, and the segments on disk."""

from __future__ import annotations

from pathlib import Path

from mta.journal.files import segments_by_owner
from mta.journal.replay import ReplayResult, adopt


def pending(directory: Path) -> ReplayResult:
    """The unapplied attempts of dead owners, read under their locks, left in place."""
    with adopt(directory) as adoption:
        return adoption.pending


def segment_paths(directory: Path, owner: str) -> list[Path]:
    """``owner``'s segments on disk, oldest first."""
    return [path for _, path in segments_by_owner(directory).get(owner, [])]
