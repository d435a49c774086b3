"""``mta fleet status``: each node's mode, readiness and queue, from its admin API, else
from its store (the daemon is down but the mail's state is still known)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

from mta.errors import StoreUnavailable
from mta.fleet.admin_client import AdminClient, AdminRefused, AdminUnreachable
from mta.fleet.inventory import Fleet, NodeEntry
from mta.fleet.stores import open_node_store


@dataclass
class NodeStatus:
    """One node's row of ``mta fleet status``."""

    node: str
    #: ``admin API``, ``store`` (the API did not answer) or ``unreachable``.
    source: str
    mode: str | None = None
    ready: bool | None = None
    store_up: bool | None = None
    by_state: dict[str, int] = field(default_factory=dict)
    oldest_pending_s: float | None = None
    delivered_last_minute: int | None = None
    journal_backlog: int | None = None
    #: Why a source was not used (the admin API's error, the store's).
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The row for ``--json``."""
        return asdict(self)


async def fleet_status(fleet: Fleet) -> list[NodeStatus]:
    """Every node's status, asked in parallel; a node that answers nothing is a row
    saying so, never an error."""
    return list(await asyncio.gather(*(node_status(node) for node in fleet.nodes)))


async def node_status(node: NodeEntry) -> NodeStatus:
    """``node``'s status from its admin API, or from its store when the API is down."""
    client = AdminClient(node)
    errors: list[str] = []
    try:
        code, ready = await client.get("/readyz")
        if not isinstance(ready, dict):
            raise AdminUnreachable(f"/readyz answered {code} without a JSON object")
        row = NodeStatus(node.name, "admin API", mode=ready.get("mode"), ready=code == 200,
                         store_up=bool(ready.get("store_up")))
        try:
            queue = await client.call("GET", "/v1/queue")
        except AdminRefused as exc:
            row.errors.append(f"/v1/queue: {exc}")
            return row
        row.by_state = dict(queue.get("by_state", {}))
        row.oldest_pending_s = queue.get("oldest_pending_s")
        row.delivered_last_minute = queue.get("delivered_last_minute")
        row.journal_backlog = queue.get("journal_backlog")
        return row
    except AdminUnreachable as exc:
        errors.append(f"admin API: {exc}")
    try:
        async with open_node_store(node) as opened:
            mode = await opened.store.node_mode(node.name)
            stats = await opened.store.queue_stats()
    except StoreUnavailable as exc:
        errors.append(f"store: {str(exc).splitlines()[0]}")
        return NodeStatus(node.name, "unreachable", errors=errors)
    return NodeStatus(node.name, "store", mode=mode.mode if mode else "active", ready=False,
                      store_up=True, by_state=stats.by_state,
                      oldest_pending_s=stats.oldest_message_s,
                      delivered_last_minute=stats.delivered_last_minute, errors=errors)
