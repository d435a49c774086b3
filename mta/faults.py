"""Named kill points for crash tests.

``fault_point("journal.after_append")`` does nothing unless the process was started with
``MTA_FAULT_HOOKS=1`` and ``MTA_FAULT_KILL_AT=journal.after_append``; then it sends SIGKILL
to its own process at the point's Nth hit (``MTA_FAULT_KILL_AFTER``, default 1). The
environment is read once, at import, so production pays one string comparison per point.
"""

from __future__ import annotations

import itertools
import os
import signal

_ARMED = os.environ.get("MTA_FAULT_HOOKS") == "1"
_KILL_AT = os.environ.get("MTA_FAULT_KILL_AT", "") if _ARMED else ""
_KILL_AFTER = int(os.environ.get("MTA_FAULT_KILL_AFTER", "1")) if _KILL_AT else 1
_hits = itertools.count(1)


def fault_point(name: str) -> None:
    """SIGKILL this process if a crash test armed the point ``name``."""
    if _KILL_AT and name == _KILL_AT and next(_hits) >= _KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)
