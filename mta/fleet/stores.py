"""Open a fleet node's store from the inventory: its DSN, or its config (like ``mta queue``).

Fleet commands read and write a node's store directly when they must (its daemon is
down, or reroute reads the source), over a small pool of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mta.config import Settings, load_settings
from mta.config.settings import DatabaseSection, NodeSection
from mta.errors import ConfigError, StoreUnavailable
from mta.fleet.inventory import NodeEntry
from mta.queue.pool import SharedPool
from mta.queue.store import Store

#: A fleet command's pool on a node's store: two statements at once, plus the fixed two.
FLEET_WORKERS = 2


@dataclass
class NodeStore:
    """A node's store as a fleet command holds it."""

    node: NodeEntry
    settings: Settings
    dsn: str
    pool: SharedPool

    @property
    def store(self) -> Store:
        """The node's store API over this pool."""
        return Store(self.pool, self.settings)


def node_settings(node: NodeEntry) -> Settings:
    """``node``'s settings: its own config (whose node name must be the inventory's), or
    only its name and DSN."""
    if node.config is None:
        return Settings.model_construct(node=NodeSection(name=node.name),
                                        database=DatabaseSection(dsn=node.store))
    settings = load_settings(node.config)
    if settings.node.name != node.name:
        raise ConfigError(f"node {node.name}: its config {node.config} names the node "
                          f"{settings.node.name!r}")
    return settings


def _fleet_sized(settings: Settings) -> Settings:
    """``settings`` with the small pool of a fleet command."""
    sized = settings.node.model_copy(update={"workers": FLEET_WORKERS, "intake_db_slots": 1,
                                             "processes": 1})
    return settings.model_copy(update={"node": sized})


@asynccontextmanager
async def open_node_store(node: NodeEntry) -> AsyncIterator[NodeStore]:
    """``node``'s store, schema checked (never migrated); ``StoreUnavailable`` when it
    cannot be reached or its schema is not this version's."""
    from mta.supervisor import existing_store

    settings = node_settings(node)
    try:
        async with existing_store(settings) as dsn:
            sized = _fleet_sized(settings)
            pool = await SharedPool.open(dsn, sized)
            try:
                yield NodeStore(node, sized, dsn, pool)
            finally:
                await pool.close()
    except StoreUnavailable as exc:
        if str(exc).startswith(f"node {node.name}:"):
            raise
        raise StoreUnavailable(f"node {node.name}: {exc}") from exc
