"""``mta fleet drain | isolate | activate``: through the admin API, else the node's store.

An emergency never waits: when the node's admin API does not answer, the mode goes
straight into the node's store (audited there), which the node follows by NOTIFY or
within ``node.mode_poll``, and which a stopped node reads when it starts (I8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from mta.errors import StaleTerm, StoreUnavailable
from mta.fleet.admin_client import AdminClient, AdminRefused, AdminUnreachable
from mta.fleet.inventory import NodeEntry
from mta.fleet.stores import open_node_store
from mta.queue.records import NodeModeName

#: What each command sets.
COMMAND_MODES: dict[str, NodeModeName] = {
    "drain": "draining", "isolate": "isolated", "activate": "active"}


class ModeChangeFailed(Exception):
    """Neither the admin API nor the store took the change."""


@dataclass(frozen=True)
class ModeChange:
    """Where a mode change went, and why the fallback was needed."""

    node: str
    mode: NodeModeName
    #: ``admin API`` or ``store``.
    via: str
    #: Why the admin API was not used (empty when it was).
    fallback_reason: str = ""


async def change_mode(node: NodeEntry, mode: NodeModeName, reason: str, operator: str,
                      term: int | None = None) -> ModeChange:
    """Set ``node``'s mode; ``ModeChangeFailed`` when neither way works. A node that
    refuses the token is an error, not a reason to go around its API. A controller
    passes its ``term``: a node that accepted a newer one refuses (``StaleTerm``)."""
    body = {"mode": mode, "reason": reason, "by": operator,
            **({"term": term} if term is not None else {})}
    try:
        answer = await AdminClient(node).call("POST", "/v1/state", body)
        return ModeChange(node.name, cast(NodeModeName, answer.get("mode", mode)), "admin API")
    except AdminUnreachable as exc:
        fallback = f"admin API unreachable: {exc}"
    except AdminRefused as exc:
        if exc.status in (401, 403):
            raise ModeChangeFailed(f"{node.name}: the admin API refused the token ({exc}); "
                                   "check token/token_env in fleet.toml") from None
        if exc.status == 409:
            raise StaleTerm(f"{node.name}: {exc}") from None
        fallback = f"admin API answered {exc}"
    try:
        async with open_node_store(node) as opened:
            changed = await opened.store.set_node_mode(node.name, mode, reason, operator, term)
    except StoreUnavailable as exc:
        raise ModeChangeFailed(f"{node.name}: {fallback}; and its store: "
                               f"{str(exc).splitlines()[0]}") from None
    return ModeChange(node.name, changed.mode, "store", fallback)
