"""Checks before a node starts: connection budget (I6) and durability (I1)."""

from __future__ import annotations

from dataclasses import dataclass

from mta.config import ConnectionBudget, Settings, budget_violation, connection_budget
from mta.errors import BudgetExceeded, UnsafeDatabase
from mta.queue.server import ServerState, connect_once, read_server_state


@dataclass(frozen=True)
class PreflightReport:
    """What the checks saw, for ``mta config check`` to print."""

    budget: ConnectionBudget
    server: ServerState
    available: int


async def preflight(settings: Settings, dsn: str, *, embedded: bool) -> PreflightReport:
    """Read the server and refuse a budget or durability setting that would break I1/I6."""
    conn = await connect_once(dsn, settings.database.connect_timeout)
    try:
        server = await read_server_state(conn)
    finally:
        await conn.close()
    budget = connection_budget(settings)
    reserve = settings.database.connections_reserve
    problem = budget_violation(budget, server.limits, reserve)
    if problem is not None:
        raise BudgetExceeded(problem)
    unsafe = server.unsafe_settings()
    if unsafe and not embedded and not settings.database.allow_unsafe_durability:
        raise UnsafeDatabase(
            "the database runs with " + " and ".join(unsafe)
            + ": a 250 would not survive a crash; fix the server or set "
            "database.allow_unsafe_durability = true"
        )
    return PreflightReport(budget, server, server.limits.available(reserve))
