"""Reroute's statements on a node's store (DESIGN.md, "Reroute is a handoff with receipts").

On the source, :class:`HandoffSource` holds the source's reroute lock for a whole run,
leases pending deliveries to the run (each with the target its message goes to), reads
their messages and writes the receipts. On a target, :class:`HandoffTarget` inserts the
copies under unique keys on their origin, so a repeated handoff finds the first copy.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from mta.errors import StoreUnavailable
from mta.queue.ids import new_message_id
from mta.queue.pool import SharedPool, unavailable_on_error
from mta.queue.sql import query


@dataclass(frozen=True)
class HandedDelivery:
    """A delivery leased to a reroute run, with what its copy keeps."""

    id: int
    message_id: uuid.UUID
    recipient: str
    next_hop: str
    attempts: int
    last_reply_code: int | None
    last_reply: str | None
    possible_duplicate: bool
    #: The node the copy goes to (fixed when leased: a copy may already be there).
    target: str
    #: The message's size, for batching bodies by bytes.
    size_bytes: int


@dataclass(frozen=True)
class MessageCopy:
    """A message as its copy on the target keeps it."""

    id: uuid.UUID
    mail_from: str
    size_bytes: int
    trace_headers: bytes
    #: As stored on the source, in ``body_encoding``: the copy keeps both.
    body: bytes
    client_address: str
    helo_name: str
    auth_user: str | None
    message_id_header: str | None
    received_at: datetime
    body_encoding: str = "identity"


@dataclass(frozen=True)
class LeftBehind:
    """What a reroute does not move, by state."""

    leased: int
    uncertain: int
    held: int
    in_handoff: int


def _handed(row: asyncpg.Record) -> HandedDelivery:
    return HandedDelivery(
        row["id"], row["message_id"], row["recipient"], row["next_hop"], row["attempts"],
        row["last_reply_code"], row["last_reply"], row["possible_duplicate"],
        row["reroute_target"], int(row["size_bytes"]))


class ReroutedElsewhere(Exception):
    """Another reroute run of the same source is alive."""


class HandoffSource:
    """The source store's side of one reroute run, over one held connection (the lock)."""

    def __init__(self, conn: Any, run_owner: str, timeout: float) -> None:
        self._conn = conn
        self.owner = run_owner
        self._timeout = timeout

    @classmethod
    @asynccontextmanager
    async def locked(cls, pool: SharedPool, node: str, run_owner: str,
                     timeout: float) -> AsyncIterator[HandoffSource]:
        """Hold ``node``'s reroute lock for the run; ``ReroutedElsewhere`` if a live run
        holds it. The lock dies with the connection, so a killed run frees it."""
        with unavailable_on_error("reroute_lock"):
            async with pool.connection("maintenance") as conn:
                if not await conn.fetchval(query("reroute_lock"), node, timeout=timeout):
                    raise ReroutedElsewhere(f"another reroute of {node} is running")
                try:
                    yield cls(conn, run_owner, timeout)
                finally:
                    conn.terminate()  # the only way to be sure the session lock is gone

    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        with unavailable_on_error(name):
            rows: list[asyncpg.Record] = await self._conn.fetch(query(name), *args,
                                                                timeout=self._timeout)
            return rows

    async def adopt(self, limit: int, lease_s: float) -> list[HandedDelivery]:
        """Take over handoffs that dead runs left (each keeps its target)."""
        return [_handed(row) for row in await self._fetch("reroute_adopt", self.owner, limit,
                                                          lease_s)]

    async def lease(self, limit: int, lease_s: float,
                    targets: Sequence[str]) -> list[HandedDelivery]:
        """Lease about ``limit`` pending deliveries (whole messages) spread over ``targets``."""
        if not targets:
            raise ValueError("a lease needs at least one target")
        return [_handed(row) for row in await self._fetch("reroute_lease", self.owner, limit,
                                                          lease_s, list(targets))]

    async def contents(self, message_ids: Sequence[uuid.UUID]) -> list[MessageCopy]:
        """The messages ``message_ids`` with their bodies (the caller bounds the bytes)."""
        rows = await self._fetch("reroute_contents", list(message_ids))
        return [MessageCopy(**{**dict(row), "trace_headers": bytes(row["trace_headers"]),
                               "body": bytes(row["body"])}) for row in rows]

    async def receipt(self, copies: Sequence[tuple[int, uuid.UUID]]) -> set[int]:
        """Mark deliveries rerouted to their copies (delivery id, target message id);
        returns the ids this run still held, and finishes their messages here."""
        with unavailable_on_error("reroute_receipt"):
            async with self._conn.transaction():
                rows = await self._conn.fetch(query("reroute_receipt"), self.owner,
                                              [d for d, _ in copies], [m for _, m in copies],
                                              timeout=self._timeout)
                done = [row["id"] for row in rows]
                if done:
                    await self._conn.execute(query("message_mark_done"), done,
                                             timeout=self._timeout)
        return set(done)

    async def release(self, delivery_ids: Sequence[int]) -> set[int]:
        """Give back handoffs no target was asked to copy; they are pending again."""
        rows = await self._fetch("reroute_release", self.owner, list(delivery_ids))
        return {row["id"] for row in rows}

    async def left_behind(self) -> LeftBehind:
        """What stays on the source: leased, uncertain, held, and handoffs in progress."""
        (row,) = await self._fetch("reroute_skipped")
        return LeftBehind(int(row["leased"]), int(row["uncertain"]), int(row["held"]),
                          int(row["in_handoff"]))


class HandoffTarget:
    """A target store's side: copies inserted idempotently, in one transaction each."""

    def __init__(self, pool: SharedPool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def insert(
        self, source_node: str, run_owner: str, copies: Sequence[MessageCopy],
        deliveries: Sequence[HandedDelivery],
    ) -> tuple[dict[uuid.UUID, uuid.UUID], int]:
        """Commit copies of ``copies`` and ``deliveries`` (or find those a run made
        before); returns each source message's copy id and how many deliveries are new
        here (the rest were handed over before). Wakes the target's workers."""
        messages = (
            [new_message_id() for _ in copies], [c.id for c in copies],
            [c.mail_from for c in copies], [c.size_bytes for c in copies],
            [c.trace_headers for c in copies], [c.body for c in copies],
            [c.client_address for c in copies], [c.helo_name for c in copies],
            [c.auth_user for c in copies], [c.message_id_header for c in copies],
            [c.received_at for c in copies], [c.body_encoding for c in copies])
        handed = (
            [d.message_id for d in deliveries], [d.id for d in deliveries],
            [d.recipient for d in deliveries], [d.next_hop for d in deliveries],
            [d.attempts for d in deliveries], [d.last_reply_code for d in deliveries],
            [d.last_reply for d in deliveries], [d.possible_duplicate for d in deliveries])
        with unavailable_on_error("handoff_insert"):
            async with self._pool.connection("delivery") as conn, conn.transaction():
                rows = await conn.fetch(query("handoff_insert_messages"), source_node,
                                        *messages, timeout=self._timeout)
                added = await conn.fetchval(query("handoff_insert_deliveries"), source_node,
                                            *handed, run_owner, timeout=self._timeout)
                await conn.execute(query("deliveries_notify"), "reroute", timeout=self._timeout)
        found = {row["origin"]: row["id"] for row in rows}
        missing = {d.message_id for d in deliveries} - found.keys()
        if missing:
            raise StoreUnavailable(f"the target holds no copy of {len(missing)} message(s)")
        return found, int(added)
