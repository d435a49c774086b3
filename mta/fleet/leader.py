"""Which controller acts: a session advisory lock in the fleet database, held on a
dedicated connection with TCP keepalives, and a term per leadership (its fencing token).

The leader pings its connection every poll; when a ping fails or is late, it stops
acting at once and drops the connection, so it has stopped before the server frees the
lock for another (the server notices a dead peer only after its keepalives give up:
``tcp_keepalives_idle + tcp_keepalives_interval x tcp_keepalives_count`` seconds). A
leader that lost its lock without noticing still carries an old term, which nodes
refuse. Session locks need a session: behind PgBouncer, use session pooling.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from mta.fleet.audit import connect_fleet_database, fleet_query
from mta.queue.server import STORE_ERRORS

log = structlog.get_logger(__name__)

#: The server's keepalives on the leader's session: a dead leader's lock is freed after
#: about idle + interval x count seconds.
KEEPALIVES = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
              "tcp_keepalives_count": "3"}
#: Seconds a leader's ping may take before it gives the leadership up.
PING_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SharedState:
    """The fleet's controller state: the current term and leader, and the pause."""

    term: int
    leader: str | None
    leader_since: datetime | None
    paused: bool
    paused_reason: str | None
    paused_by: str | None
    paused_at: datetime | None


async def read_state(conn: Any) -> SharedState:
    """The shared state, from any connection to the fleet database."""
    row = await conn.fetchrow(fleet_query("controller_state_get"))
    return SharedState(**dict(row))


async def set_paused(conn: Any, paused: bool, reason: str, operator: str) -> None:
    """Pause or resume every controller's actions."""
    await conn.execute(fleet_query("controller_pause_set"), paused, reason, operator)


class Leadership:
    """One controller's claim on the fleet: ``term`` is set while it leads."""

    def __init__(self, dsn: str, identity: str) -> None:
        self._dsn = dsn
        self.identity = identity
        self._conn: asyncpg.Connection | None = None
        self.term: int | None = None
        self.last_error = ""

    @property
    def leading(self) -> bool:
        """Whether this controller may act now."""
        return self.term is not None

    async def refresh(self) -> SharedState | None:
        """Keep or try to take the leadership, and read the shared state (None when the
        fleet database cannot be reached: then nobody here leads)."""
        try:
            if self._conn is None:
                self._conn = await connect_fleet_database(self._dsn, KEEPALIVES)
            conn = self._conn
            await conn.fetchval(fleet_query("controller_ping"), timeout=PING_TIMEOUT_S)
            if self.term is None and await conn.fetchval(fleet_query("controller_lock")):
                self.term = int(await conn.fetchval(fleet_query("controller_new_term"),
                                                    self.identity))
                log.warning("controller.leading", term=self.term, identity=self.identity)
            return await read_state(conn)
        except STORE_ERRORS as exc:
            self.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            await self.step_down(self.last_error)
            return None

    async def step_down(self, why: str) -> None:
        """Stop acting and drop the connection (and with it the lock)."""
        if self.term is not None:
            log.warning("controller.stepped_down", term=self.term, why=why)
        self.term = None
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*STORE_ERRORS):
                conn.terminate()

    @property
    def connection(self) -> Any:
        """The leader's connection (for the pause flag and the audit of decisions)."""
        return self._conn
