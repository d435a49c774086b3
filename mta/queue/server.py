"""The database server itself: its limits and durability settings, one-off connections,
migrations, and the errors that mean it did not answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from mta.config import ServerLimits
from mta.errors import StoreUnavailable
from mta.queue.migrate import migrate, pending_migrations
from mta.queue.sql import query

#: Errors that mean "the store refused this data": retrying the same values cannot help.
#: (A string the driver cannot encode fails before it is sent.)
REJECTED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    UnicodeEncodeError,
)
#: Errors that mean "the store did not answer in time or at all".
STORE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True)
class ServerState:
    """The database server's limits and durability settings."""

    limits: ServerLimits
    fsync: str
    synchronous_commit: str

    def unsafe_settings(self) -> list[str]:
        """Settings that would let a committed message vanish in a crash."""
        unsafe = []
        if self.fsync != "on":
            unsafe.append(f"fsync = {self.fsync}")
        if self.synchronous_commit not in ("on", "remote_write", "remote_apply"):
            unsafe.append(f"synchronous_commit = {self.synchronous_commit}")
        return unsafe


async def read_server_state(
    conn: asyncpg.Connection | PoolConnectionProxy[Any],
) -> ServerState:
    """Read limits and durability settings over an existing connection."""
    row = await conn.fetchrow(query("server_limits"))
    assert row is not None
    limits = ServerLimits(
        max_connections=row["max_connections"],
        superuser_reserved=row["superuser_reserved"],
        in_use=row["in_use"],
    )
    return ServerState(limits, row["fsync"], row["synchronous_commit"])


async def connect_once(dsn: str, timeout: float) -> asyncpg.Connection:
    """One connection outside any pool (config checks, migrations)."""
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except STORE_ERRORS as exc:
        raise StoreUnavailable(f"cannot connect to the database: {exc}") from exc


async def schema_behind(dsn: str, timeout: float = 10.0) -> list[int]:
    """The migrations the database at ``dsn`` lacks; changes nothing."""
    conn = await connect_once(dsn, timeout)
    try:
        return await pending_migrations(conn)
    finally:
        await conn.close()


async def migrate_dsn(dsn: str, timeout: float = 10.0) -> list[int]:
    """Apply pending migrations to the database at ``dsn``."""
    conn = await connect_once(dsn, timeout)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
