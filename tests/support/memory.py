"""Memory of node processes, as DESIGN.md measures it: ``VmHWM`` in ``/proc/PID/status``."""

from __future__ import annotations

import re
from pathlib import Path

_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
_BOUND = re.compile(r"memory bound per process:\s+([0-9.]+)\s+(B|KiB|MiB|GiB)")


def status_bytes(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``…) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            number, unit = value.split()
            assert unit == "kB", line
            return int(number) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def vm_hwm_bytes(pid: int) -> int:
    """The peak resident set size of process ``pid`` so far."""
    return status_bytes(pid, "VmHWM")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's list)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found.extend(int(child) for child in text.split())
    return found


def node_processes(serve_pid: int, processes: int) -> list[int]:
    """The node processes of ``mta serve`` (its pid when it runs one, else its children).

    With ``node.processes = 1`` the serve process runs the node itself
    (``mta/supervisor.py``); with more it forks one child per process. An embedded
    PostgreSQL would be a child too, so it is only used with a configured DSN.
    """
    if processes == 1:
        return [serve_pid]
    found = children(serve_pid)
    assert len(found) == processes, (serve_pid, found)
    return found


def parse_memory_bound(config_check_output: str) -> int:
    """The bytes in ``memory bound per process: 240.0 MiB`` from ``mta config check``."""
    found = _BOUND.search(config_check_output)
    assert found is not None, f"no memory bound in:\n{config_check_output}"
    return int(float(found[1]) * _UNITS[found[2]])
