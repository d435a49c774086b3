"""The state file in a node's data directory that mirrors its mode (DESIGN.md I8)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mta.queue.records import NodeModeName

#: The state file's name in the data directory.
MODE_FILE = "mode"


def read_mode_file(path: Path) -> NodeModeName | None:
    """The mode the state file mirrors, or None without a readable one."""
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="ascii").strip()
        if text == "active":
            return "active"
        if text == "draining":
            return "draining"
        if text == "isolated":
            return "isolated"
    return None


def write_mode_file(path: Path, mode: NodeModeName) -> None:
    """Mirror ``mode`` durably in the state file (atomically: a new file, renamed)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}")
    with temporary.open("w", encoding="ascii") as handle:
        handle.write(mode + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
