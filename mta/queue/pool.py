"""A node process's connection pool, shared by role (I6).

Each role (intake commits, delivery statements, the fixed upkeep connections) waits
for a slot of its own share before it takes a connection, so one role under load never
holds the connections another commits with. Driver and network errors become
:class:`StoreUnavailable` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from mta.concurrency import acquire_within
from mta.config import Settings
from mta.config.budget import role_shares
from mta.config.settings import ProcessRole
from mta.errors import StoreRejected, StoreUnavailable
from mta.faults import fault_delay
from mta.queue.server import REJECTED_ERRORS, STORE_ERRORS
from mta.queue.sql import query

#: The roles that share a process's pool, each within its own part of it (I6): intake
#: commits, delivery's statements (and the store's upkeep), and the fixed two (the NOTIFY
#: listener and the health check, queue figures and wake-ups).
Share = Literal["intake", "delivery", "maintenance"]
#: Told of each wait for a slot: the share, the seconds waited, and whether it timed out.
AcquireObserver = Callable[[Share, float, bool], None]


async def _keep_session(_: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release reset round trip: no statement here changes session state."""


@contextlib.contextmanager
def unavailable_on_error(name: str) -> Iterator[None]:
    """Driver and network errors in the block raise ``StoreUnavailable`` naming ``name``;
    data the store refuses raises ``StoreRejected``."""
    try:
        yield
    except REJECTED_ERRORS as exc:
        raise StoreRejected(f"{name}: {type(exc).__name__}: {exc}") from exc
    except STORE_ERRORS as exc:
        raise StoreUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc


class SharedPool:
    """One process's asyncpg pool, sized by the budget, split into role shares."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings,
                 on_acquire: AcquireObserver | None = None, role: ProcessRole = "both") -> None:
        self._pool = pool
        self._db = settings.database
        # I6: each role has its own share of the pool, so delivery under load never
        # holds the connections intake commits with (nor the health check's). A role
        # the process does not run has no share: its odd statement takes a fixed slot.
        sizes = role_shares(settings, role)
        maintenance = asyncio.Semaphore(sizes["maintenance"])
        self._shares: dict[Share, asyncio.Semaphore] = {
            "intake": asyncio.Semaphore(sizes["intake"]) if "intake" in sizes else maintenance,
            "delivery": (asyncio.Semaphore(sizes["delivery"]) if "delivery" in sizes
                         else maintenance),
            "maintenance": maintenance,
        }
        #: The node's metrics hook (``Metrics.observe_acquire``), or None.
        self.on_acquire = on_acquire

    @classmethod
    async def open(cls, dsn: str, settings: Settings,
                   on_acquire: AcquireObserver | None = None,
                   role: ProcessRole = "both") -> SharedPool:
        """Create the pool of a process of ``role``: ``workers`` for delivery,
        ``intake_db_slots`` for intake, plus 2 (I6)."""
        size = sum(role_shares(settings, role).values())
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=size,
                timeout=settings.database.connect_timeout,
                command_timeout=settings.database.commit_timeout,
                reset=_keep_session,
                server_settings={
                    "synchronous_commit": "on",
                    "application_name": f"mta/{settings.node.name}",
                },
            )
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"cannot open the connection pool: {exc}") from exc
        return cls(pool, settings, on_acquire, role)

    async def close(self) -> None:
        """Close every connection, waiting at most the commit timeout."""
        try:
            await asyncio.wait_for(self._pool.close(), self._db.commit_timeout)
        except TimeoutError:
            self._pool.terminate()

    @property
    def size(self) -> int:
        """Connections the pool may open."""
        return self._pool.get_max_size()

    @property
    def in_use(self) -> int:
        """Connections currently checked out of the pool."""
        return self._pool.get_size() - self._pool.get_idle_size()

    @contextlib.asynccontextmanager
    async def slot(self, share: Share) -> AsyncIterator[None]:
        """Hold a slot of ``share``; waiting longer than the acquire timeout fails."""
        semaphore = self._shares[share]
        started = time.perf_counter()
        acquired = await acquire_within(semaphore, self._db.acquire_timeout)
        if self.on_acquire is not None:
            self.on_acquire(share, time.perf_counter() - started, not acquired)
        if not acquired:
            raise StoreUnavailable(f"no {share} database slot became free in time")
        try:
            yield
        finally:
            semaphore.release()

    @contextlib.asynccontextmanager
    async def connection(self, share: Share) -> AsyncIterator[PoolConnectionProxy[Any]]:
        """A pool connection of ``share``, within the acquire timeout."""
        async with self.slot(share), self._pooled() as conn:
            if share == "delivery":
                delay = fault_delay("store.delivery_statement")
                if delay:
                    await conn.execute(query("fault_sleep"), delay)
            yield conn

    @contextlib.asynccontextmanager
    async def _pooled(self) -> AsyncIterator[PoolConnectionProxy[Any]]:
        try:
            conn = await self._pool.acquire(timeout=self._db.acquire_timeout)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"no database connection: {exc}") from exc
        try:
            yield conn
        except asyncpg.PostgresError:
            raise  # the server answered with an error: the session is in step
        except BaseException:
            # A timeout, a cancel or a broken link: the statement may still be running or
            # the protocol be mid-message, and a released connection would hand the next
            # caller "another operation is in progress" (releases skip asyncpg's reset).
            # Drop it rather than wait for the server to confirm anything.
            conn.terminate()
            raise
        finally:
            await self._pool.release(conn)

    async def run(self, name: str, method: str, *args: Any,
                   share: Share = "delivery") -> Any:
        """Run one named statement on a connection of ``share``, within the timeout."""
        with unavailable_on_error(name):
            async with self.connection(share) as conn:
                call = getattr(conn, method)
                return await call(query(name), *args, timeout=self._db.commit_timeout)
