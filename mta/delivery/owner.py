"""Lease and journal owners: one per process start, named after the node."""

from __future__ import annotations

import os
import re
import time

_OWNER_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def process_owner(node_name: str) -> str:
    """This process's lease and journal owner: node name, pid and start time."""
    return f"{owner_prefix(node_name)}{os.getpid()}-{time.time_ns() // 1_000_000}"


def owner_prefix(node_name: str) -> str:
    """The prefix every owner of ``node_name`` starts with."""
    return f"{_OWNER_UNSAFE.sub('_', node_name)}-"


def like_literal(text: str) -> str:
    """``text`` as a LIKE pattern that matches only itself."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
