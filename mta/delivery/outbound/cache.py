"""Idle outbound connections kept per next hop for reuse."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable

from mta.config import DeliverySection
from mta.delivery.outbound.session import OutboundConnection
from mta.delivery.routing import NextHop


class ConnectionCache:
    """Idle connections per ``NextHop.key``, reused within their message and idle limits.

    At most ``max_cached`` idle connections are kept in all; a connection returned when
    the cache is full, or one that failed, is closed. Busy connections are not counted:
    bounding concurrency per destination is the caller's job.
    """

    def __init__(self, delivery: DeliverySection, *, ehlo_name: str, max_cached: int = 1000,
                 tls_context: ssl.SSLContext | None = None, ca_bundle: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Phase timeouts, ``connection_reuse_limit`` and ``connection_idle_timeout`` come
        from ``delivery``."""
        if max_cached < 0:
            raise ValueError("max_cached must not be negative")
        self.ehlo_name = ehlo_name
        self.timeouts = delivery
        self.max_messages_per_connection = delivery.connection_reuse_limit
        self.max_idle = delivery.connection_idle_timeout
        self.max_cached = max_cached
        self._tls_context = tls_context
        self._ca_bundle = ca_bundle
        self._clock = clock
        self._idle: dict[str, list[OutboundConnection]] = {}

    def __len__(self) -> int:
        """How many idle connections are cached."""
        return sum(len(conns) for conns in self._idle.values())

    @contextlib.asynccontextmanager
    async def session(self, next_hop: NextHop) -> AsyncIterator[OutboundConnection]:
        """A connection to ``next_hop`` for this block only: a cached one, or a new one."""
        conn = await self._take(next_hop.key)
        if conn is None:
            conn = OutboundConnection(next_hop, ehlo_name=self.ehlo_name,
                                      timeouts=self.timeouts, tls_context=self._tls_context,
                                      ca_bundle=self._ca_bundle, clock=self._clock)
        try:
            yield conn
        except BaseException:
            conn.abort()
            raise
        await self._give_back(conn)

    async def close(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.close()

    def _fresh(self, conn: OutboundConnection) -> bool:
        return (conn.reusable and conn.messages_sent < self.max_messages_per_connection
                and self._clock() - conn.idle_since < self.max_idle)

    async def _take(self, key: str) -> OutboundConnection | None:
        """The most recently used fresh idle connection for ``key``; stale ones are closed."""
        conns = self._idle.pop(key, [])
        found: OutboundConnection | None = None
        while conns and found is None:
            conn = conns.pop()
            if self._fresh(conn):
                found = conn
            else:
                await conn.close()
        if conns:
            self._idle[key] = conns
        return found

    async def _give_back(self, conn: OutboundConnection) -> None:
        if (conn.messages_sent == 0 or not self._fresh(conn)
                or len(self) >= self.max_cached):
            await conn.close()
            return
        self._idle.setdefault(conn.next_hop.key, []).append(conn)
