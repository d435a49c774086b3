"""Named kill and failure points for crash and fault tests.

``fault_point("journal.after_append")`` does nothing unless the process was started with
``MTA_FAULT_HOOKS=1`` and ``MTA_FAULT_KILL_AT=journal.after_append``; then it sends SIGKILL
to its own process at the point's Nth hit (``MTA_FAULT_KILL_AFTER``, default 1).
``fault_error("journal.write")`` raises ``OSError(ENOSPC)`` while the file named by
``MTA_FAULT_FAIL_WHILE`` exists, when ``MTA_FAULT_FAIL_AT=journal.write`` (a disk that
fills up and is freed again). ``fault_delay("store.delivery_statement")`` gives
``MTA_FAULT_SLOW_S`` seconds when ``MTA_FAULT_SLOW_AT`` names it (a slow store), else 0.
The environment is read once, at import, so production
pays one string comparison per point.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal

_ARMED = os.environ.get("MTA_FAULT_HOOKS") == "1"
_KILL_AT = os.environ.get("MTA_FAULT_KILL_AT", "") if _ARMED else ""
_KILL_AFTER = int(os.environ.get("MTA_FAULT_KILL_AFTER", "1")) if _KILL_AT else 1
_hits = itertools.count(1)
_FAIL_AT = os.environ.get("MTA_FAULT_FAIL_AT", "") if _ARMED else ""
_FAIL_WHILE = os.environ.get("MTA_FAULT_FAIL_WHILE", "") if _FAIL_AT else ""
_SLOW_AT = os.environ.get("MTA_FAULT_SLOW_AT", "") if _ARMED else ""
_SLOW_S = float(os.environ.get("MTA_FAULT_SLOW_S", "1")) if _SLOW_AT else 0.0


def fault_point(name: str) -> None:
    """SIGKILL this process if a crash test armed the point ``name``."""
    if _KILL_AT and name == _KILL_AT and next(_hits) >= _KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_error(name: str) -> None:
    """Raise ENOSPC at the point ``name`` while a fault test keeps its flag file."""
    if _FAIL_AT and name == _FAIL_AT and os.path.exists(_FAIL_WHILE):
        raise OSError(errno.ENOSPC, f"No space left on device (fault hook at {name})")


def fault_delay(name: str) -> float:
    """Seconds a fault test wants the point ``name`` to take (0: none)."""
    return _SLOW_S if _SLOW_AT and name == _SLOW_AT else 0.0
