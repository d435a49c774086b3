"""CPU seconds of whole process trees, from /proc/<pid>/stat, so a ratio travels.

A rate depends on the machine; CPU seconds per message much less. ``TreeCpu`` takes a
function that names the processes of one side (``node_pids``: the node's process tree
and its embedded PostgreSQL's; ``postfix_pids``: every process of one private Postfix
instance) and sums user + system time over them, including the time of children they
have already reaped (``cutime``/``cstime``): a Postfix ``smtp`` process or a PostgreSQL
backend that exits during the run is reaped by master or postmaster, and its time moves
into the parent's counters, so the difference of two sums counts it. A child that is
alive is counted by itself, never also by its parent. The snapshot is taken before the
load starts and again when the run is done. Load generators and smtp-sink are not part
of either side (smtp-sink is counted on its own, ``sink_pids``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from mta.queue import EmbeddedPostgres

_HZ = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (any depth), from one pass over /proc."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                parent[int(entry.name)] = int(stat[1])
    found = {root}
    grown = True
    while grown:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        grown = bool(more)
        found |= more
    return sorted(found)


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime + cutime + cstime of ``pids`` (each once), in seconds."""
    ticks = 0
    for pid in set(pids):
        stat = _stat(pid)
        if stat is not None:
            ticks += sum(int(x) for x in stat[11:15])
    return ticks / _HZ


def node_pids(node_pid: int, data_dir: Path) -> list[int]:
    """The node's processes and its embedded PostgreSQL's (pg_ctl detaches the latter)."""
    pids = set(descendants(node_pid))
    postmaster = EmbeddedPostgres(data_dir / "postgres").postmaster_pid()
    if postmaster:
        pids |= set(descendants(postmaster))
    return sorted(pids)


def postfix_pids(queue_dir: Path) -> list[int]:
    """Every process of one private Postfix: master and its daemons all chdir to the
    instance's queue directory (smtp-sink, started in the instance's root, is not one)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")).is_relative_to(queue_dir):
                pids.append(int(entry.name))
    return pids


class TreeCpu:
    """CPU seconds a changing set of processes used since creation (see module doc)."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._start = cpu_seconds(pids())
        self.seconds: float | None = None

    def stop(self) -> float:
        """Take the second snapshot (once); return the seconds used in between."""
        if self.seconds is None:
            self.seconds = max(cpu_seconds(self._pids()) - self._start, 0.0)
        return self.seconds
