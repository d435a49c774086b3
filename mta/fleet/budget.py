"""The fleet's connection budget (DESIGN.md I6): every node summed per database server.

Nodes whose stores are on one server (host names resolved to addresses, same port; a
Unix socket by its directory and port) share its ``max_connections``. Each group must
fit ``max_connections - superuser_reserved_connections - reserve``, with the largest
``database.connections_reserve`` of its nodes. A node known only by its ``store`` DSN has
no settings to count, so its server cannot be checked.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from mta.config import ServerLimits, Settings, connection_budget
from mta.config.settings import DatabaseSection
from mta.errors import StoreUnavailable
from mta.fleet.inventory import Fleet
from mta.fleet.stores import node_settings
from mta.queue.embedded import PORT as EMBEDDED_PORT
from mta.queue.server import STORE_ERRORS, connect_once, read_server_state

DEFAULT_PORT = 5432
#: PostgreSQL's default, which an embedded server (never contacted here) keeps.
DEFAULT_SUPERUSER_RESERVED = 3


@dataclass(frozen=True)
class NodeBudget:
    """One node's share of its server: its processes and pool (None: no config to count)."""

    node: str
    processes: int | None
    pool: int | None
    reserve: int
    dsn: str
    connect_timeout: float
    #: The node's exact total when its processes' pools differ (separate intake and
    #: delivery processes, each counted by its role); ``pool`` is then the largest.
    exact_total: int | None = None

    @property
    def total(self) -> int | None:
        """Connections the node opens at most, across its processes."""
        if self.exact_total is not None:
            return self.exact_total
        return None if self.pool is None or self.processes is None else self.pool * self.processes


@dataclass
class ServerGroup:
    """The nodes whose stores are on one database server."""

    label: str
    keys: set[tuple[str, int]]
    nodes: list[NodeBudget] = field(default_factory=list)
    #: Set for a node's embedded server: the ``max_connections`` it is started with.
    embedded_max_connections: int | None = None
    #: Why the server's address could not be found (a host name that does not resolve).
    unresolved: str | None = None

    @property
    def uncounted(self) -> list[str]:
        """Nodes with no config, whose connections cannot be counted."""
        return [n.node for n in self.nodes if n.total is None]

    @property
    def total(self) -> int:
        """The counted nodes' connections together."""
        return sum(n.total or 0 for n in self.nodes)

    @property
    def reserve(self) -> int:
        """The largest reserve of the group's nodes."""
        return max(n.reserve for n in self.nodes)


@dataclass(frozen=True)
class GroupVerdict:
    """A group against its server's limits (``limits`` None: the server did not answer)."""

    group: ServerGroup
    limits: ServerLimits | None
    unreachable: str | None = None

    @property
    def available(self) -> int | None:
        """Connections left for the nodes, once superusers and the reserve are kept back."""
        return None if self.limits is None else self.limits.available(self.group.reserve)

    @property
    def fits(self) -> bool | None:
        """Whether the counted total fits (None: unknown)."""
        if self.available is None or self.group.uncounted:
            return None
        return self.group.total <= self.available


def _endpoint(dsn: str) -> tuple[str, int]:
    """The DSN's host (or socket directory) and port; the first host of a list."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    hostspec = parts.netloc.rpartition("@")[2].split(",")[0]
    host, port_text = "", ""
    if hostspec.startswith("["):
        host, _, rest = hostspec[1:].partition("]")
        port_text = rest.lstrip(":")
    elif hostspec:
        host, _, port_text = hostspec.partition(":")
    host = host or query.get("host", [""])[0] or os.environ.get("PGHOST", "") or "localhost"
    port_text = port_text or query.get("port", [""])[0] or os.environ.get("PGPORT", "")
    return host.split(",")[0], int(port_text.split(",")[0]) if port_text else DEFAULT_PORT


def server_keys(dsn: str) -> tuple[str, set[tuple[str, int]]]:
    """A label and the (address, port) keys of the DSN's server; ``OSError`` when its host
    name does not resolve."""
    host, port = _endpoint(dsn)
    if host.startswith("/"):
        directory = os.path.realpath(host)
        return f"unix socket {directory} port {port}", {(f"unix:{directory}", port)}
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = {str(info[4][0]) for info in infos}
    return f"{host}:{port}", {(address, port) for address in addresses}


def _node_budget(name: str, settings: Settings | None, dsn: str) -> NodeBudget:
    if settings is None:
        defaults = DatabaseSection()
        return NodeBudget(name, None, None, defaults.connections_reserve, dsn,
                          defaults.connect_timeout)
    budget = connection_budget(settings)
    return NodeBudget(name, budget.processes, budget.pool_size,
                      settings.database.connections_reserve, dsn,
                      settings.database.connect_timeout, exact_total=budget.node_total)


def group_by_server(fleet: Fleet) -> list[ServerGroup]:
    """Every node in the group of its store's server, and a node's dedup connections in
    the group of the fleet database's server (``ConfigError`` for a bad config)."""
    from mta.supervisor import embedded_server

    groups: list[ServerGroup] = []
    for entry in fleet.nodes:
        settings = node_settings(entry) if entry.config is not None else None
        dsn = entry.store if settings is None else settings.database.dsn
        if settings is not None and not dsn:
            server = embedded_server(settings)
            _place(groups, _node_budget(entry.name, settings, dsn),
                   f"embedded {server.base_dir}",
                   {(f"unix:{os.path.realpath(server.socket_dir)}", EMBEDDED_PORT)},
                   embedded_max=server.settings.max_connections)
        else:
            _place_by_dsn(groups, _node_budget(entry.name, settings, dsn), dsn)
        if settings is not None and settings.dedup.enabled:
            budget = connection_budget(settings)
            _place_by_dsn(groups, NodeBudget(
                f"{entry.name} (dedup)", budget.processes, budget.dedup_per_process,
                settings.database.connections_reserve, settings.dedup.database,
                settings.database.connect_timeout, exact_total=budget.dedup_total),
                settings.dedup.database)
    return groups


def _place_by_dsn(groups: list[ServerGroup], budget: NodeBudget, dsn: str) -> None:
    unresolved: str | None = None
    try:
        label, keys = server_keys(dsn)
    except (OSError, ValueError) as exc:
        host, port = _endpoint(dsn)
        label, keys = f"{host}:{port}", {(f"unresolved:{host}", port)}
        unresolved = f"cannot resolve {host}: {exc}"
    _place(groups, budget, label, keys, unresolved=unresolved)


def _place(groups: list[ServerGroup], budget: NodeBudget, label: str,
           keys: set[tuple[str, int]], *, embedded_max: int | None = None,
           unresolved: str | None = None) -> None:
    """Add ``budget`` to the group of its server, merging groups that turn out shared."""
    joined = [group for group in groups if group.keys & keys]
    group = ServerGroup(joined[0].label if joined else label, set(keys),
                        embedded_max_connections=embedded_max, unresolved=unresolved)
    for other in joined:
        groups.remove(other)
        group.keys |= other.keys
        group.nodes = other.nodes + group.nodes
        group.embedded_max_connections = (group.embedded_max_connections
                                          or other.embedded_max_connections)
        group.unresolved = group.unresolved or other.unresolved
    group.nodes.append(budget)
    groups.append(group)


async def check_group(group: ServerGroup) -> GroupVerdict:
    """Read the group's server limits (through the first node DSN that connects); an
    embedded server is judged by the size it is started with, without contacting it."""
    if group.embedded_max_connections is not None:
        limits = ServerLimits(group.embedded_max_connections, DEFAULT_SUPERUSER_RESERVED, 0)
        return GroupVerdict(group, limits)
    if group.unresolved is not None:
        return GroupVerdict(group, None, group.unresolved)
    why = "no node gives a DSN"
    for node in group.nodes:
        if not node.dsn:
            continue
        try:
            conn = await connect_once(node.dsn, node.connect_timeout)
        except StoreUnavailable as exc:
            why = str(exc).splitlines()[0]
            continue
        try:
            state = await read_server_state(conn)
        except STORE_ERRORS as exc:
            why = f"cannot read the server's limits: {exc}"
            continue
        finally:
            await conn.close()
        return GroupVerdict(group, state.limits)
    return GroupVerdict(group, None, why)


async def check_fleet(fleet: Fleet) -> list[GroupVerdict]:
    """Every server group of the fleet against its server's limits."""
    return [await check_group(group) for group in group_by_server(fleet)]
