"""A node's mode in one process: the store's word, and the state file in the data
directory that mirrors it (DESIGN.md, Node modes; I8)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from mta.errors import StaleTerm, StoreUnavailable
from mta.queue.records import NodeModeName
from mta.queue.store import Store

log = structlog.get_logger(__name__)

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


class ModeKeeper:
    """One process's mode (DESIGN.md, Node modes): the store is authoritative, the state
    file mirrors it, and ``on_change`` applies it to the process's intake and delivery.

    A mode set while the store is down applies at once (here and in the state file) and
    goes into the store when it answers, so a node whose store failed can be isolated.
    """

    def __init__(self, node: str, data_dir: Path,
                 on_change: Callable[[NodeModeName], None]) -> None:
        self._node = node
        self._file = data_dir / MODE_FILE
        self._on_change = on_change
        #: A node that can read its mode from neither place starts isolated (I8).
        self.mode: NodeModeName = read_mode_file(self._file) or "isolated"
        self._pending: tuple[NodeModeName, str, str, int | None] | None = None

    def apply(self, mode: NodeModeName) -> None:
        """Follow ``mode`` in this process and mirror it in the state file."""
        if mode != self.mode:
            log.warning("node.mode", mode=mode, was=self.mode)
        self.mode = mode
        self._on_change(mode)
        if read_mode_file(self._file) != mode:
            write_mode_file(self._file, mode)

    async def state(self, store: Store | None) -> dict[str, Any]:
        """The mode, why, by whom, since when and the controller term (from the store when
        it answers, else what this process follows); ``stored`` false while a change
        waits for the store."""
        found = None
        if store is not None and self._pending is None:
            with contextlib.suppress(StoreUnavailable):
                found = await store.node_mode(self._node)
        if found is None:
            mode, reason, by, term = self._pending or (self.mode, None, None, None)
            return {"mode": mode, "reason": reason, "by": by, "at": None, "term": term,
                    "stored": self._pending is None}
        return {"mode": found.mode, "reason": found.reason, "by": found.changed_by,
                "at": found.changed_at.isoformat(), "term": found.term, "stored": True}

    async def set(self, store: Store | None, mode: NodeModeName, reason: str, by: str,
                  term: int | None) -> dict[str, Any]:
        """Set the mode in the store (audited) and apply it; with the store down, apply
        it now and store it when the store answers. ``StaleTerm`` from the store passes."""
        try:
            if store is None:
                raise StoreUnavailable("the store is not reachable yet")
            changed = await store.set_node_mode(self._node, mode, reason, by, term)
        except StoreUnavailable:
            self._pending = (mode, reason, by, term)
            log.warning("node.mode_pending", mode=mode, by=by, reason=reason)
            self.apply(mode)
            return await self.state(store)
        self._pending = None
        self.apply(changed.mode)
        return await self.state(store)

    async def follow(self, store: Store) -> None:
        """Store a change that waited, then read the mode from the store and apply it.
        Unreachable: the mode stays as it was."""
        with contextlib.suppress(StoreUnavailable):
            if self._pending is not None:
                with contextlib.suppress(StaleTerm):  # a newer controller came meanwhile
                    await store.set_node_mode(self._node, *self._pending)
                self._pending = None
            found = await store.node_mode(self._node)
            self.apply(found.mode if found is not None else "active")
