"""The store's operator side: listings, the queue summary and audited transitions.

A part of :class:`mta.queue.store.Store` (a mixin, so ``store.py`` stays short). Each
statement on deliveries with work left runs once per state, with the state a constant in
its plan, so it walks that state's partial index and never delivered or failed history.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import asyncpg

from mta.config.settings import DatabaseSection
from mta.queue.body_codec import decode_head
from mta.queue.message_copy import insert_args
from mta.queue.pool import SharedPool, unavailable_on_error
from mta.queue.records import (
    DeletedMessage,
    DeliveryEvent,
    DeliveryFilter,
    DeliveryListing,
    NewMessage,
    QueueGroup,
)
from mta.queue.sql import query

#: Message age bucket bounds of ``mta queue summary``, in minutes (Postfix's qshape).
AGE_BOUNDS_MIN = (5, 10, 20, 40, 80, 160)


class QueueTools:
    """Operator reads and transitions (``mta queue …``); every change is audited."""

    _pool: SharedPool
    _node: str
    _db: DatabaseSection
    _compress_above: int

    async def _mark_done(self, delivery_ids: set[int]) -> None:
        """Set ``done_at`` on messages whose every delivery is now final."""
        if delivery_ids:
            await self._pool.run("message_mark_done", "execute", list(delivery_ids))

    async def _operator_transition(self, ids: Sequence[int], source: str | Sequence[str],
                                   target: str, operator: str, reason: str, action: str,
                                   evidence: str | None = None) -> set[int]:
        sources = [source] if isinstance(source, str) else list(source)
        rows = await self._pool.run("delivery_operator_transition", "fetch", list(ids),
                                    sources, target, operator, reason, action, self._node,
                                    evidence)
        changed = {row["delivery_id"] for row in rows}
        await self._mark_done(changed)
        return changed

    async def resend_uncertain(self, ids: Sequence[int], operator: str, reason: str) -> set[int]:
        """Queue ``uncertain`` deliveries again; they carry ``possible_duplicate`` from now on."""
        return await self._operator_transition(ids, "uncertain", "queued", operator, reason,
                                               "resend")

    async def mark_uncertain_delivered(self, ids: Sequence[int], operator: str,
                                       reason: str) -> set[int]:
        """Record an operator's word that ``uncertain`` deliveries did arrive."""
        return await self._operator_transition(ids, "uncertain", "delivered", operator, reason,
                                               "mark-delivered")

    async def hold(self, ids: Sequence[int], operator: str, reason: str) -> set[int]:
        """Hold queued or deferred deliveries; nothing sends them until released."""
        return await self._operator_transition(ids, ("queued", "deferred"), "held", operator,
                                               reason, "hold")

    async def release_held(self, ids: Sequence[int], operator: str, reason: str) -> set[int]:
        """Put ``held`` deliveries back in the queue, due now."""
        return await self._operator_transition(ids, "held", "queued", operator, reason,
                                               "release")

    async def retry_now(self, ids: Sequence[int], operator: str, reason: str) -> set[int]:
        """Make queued or deferred deliveries due now (``resend`` is for uncertain ones)."""
        return await self._operator_transition(ids, ("queued", "deferred"), "queued", operator,
                                               reason, "retry")

    async def delete(self, ids: Sequence[int], operator: str, reason: str, *,
                     include_uncertain: bool = False) -> set[int]:
        """Fail queued, deferred and held deliveries (uncertain ones too when asked), with
        the evidence "deleted by <operator>: <reason>". Leased ones are never touched; the
        records stay until retention purges them."""
        sources = ("queued", "deferred", "held", *(("uncertain",) if include_uncertain else ()))
        return await self._operator_transition(ids, sources, "failed", operator, reason,
                                               "delete", f"deleted by {operator}: {reason}")

    async def deliveries_in_state(self, state: str, limit: int = 1000) -> list[DeliveryListing]:
        """Deliveries in ``state``, oldest change first."""
        rows = await self._pool.run("delivery_list_in_state", "fetch", state, limit)
        return [DeliveryListing(**dict(row)) for row in rows]

    async def delivery_events(self, delivery_id: int) -> list[DeliveryEvent]:
        """One delivery's evidence timeline, oldest first."""
        rows = await self._pool.run("delivery_events_list", "fetch", delivery_id)
        return [DeliveryEvent(**dict(row)) for row in rows]

    async def queue_summary(self) -> list[QueueGroup]:
        """Deliveries with work left by state, next hop and age bucket (``AGE_BOUNDS_MIN``)."""
        rows = await self._pool.run("queue_summary", "fetch", [float(b) for b in AGE_BOUNDS_MIN])
        return [QueueGroup(row["state"], row["next_hop"], int(row["bucket"]), int(row["count"]),
                           int(row["bytes"])) for row in rows]

    async def filter_deliveries(self, chosen: DeliveryFilter,
                                limit: int) -> list[DeliveryListing]:
        """Deliveries matching ``chosen``, oldest message first, at most ``limit``."""
        found: list[DeliveryListing] = []
        for state in chosen.states:
            rows = await self._pool.run("delivery_filter", "fetch", state, chosen.destination,
                                        chosen.older_than_s, chosen.sender, limit)
            found += [DeliveryListing(**dict(row)) for row in rows]
        found.sort(key=lambda d: (d.received_at, d.id))
        return found[:limit]

    async def deliveries_of_messages(self, message_ids: Sequence[uuid.UUID],
                                     states: Sequence[str]) -> list[int]:
        """The ids of the deliveries of ``message_ids`` in any of ``states``."""
        rows = await self._pool.run("delivery_ids_of_messages", "fetch", list(message_ids),
                                    list(states))
        return [row["id"] for row in rows]

    async def delivery_states(self, ids: Sequence[int]) -> dict[int, str]:
        """The state of each of ``ids`` that exists."""
        rows = await self._pool.run("delivery_states_of", "fetch", list(ids))
        return {row["id"]: row["state"] for row in rows}

    async def message_of_delivery(self, delivery_id: int) -> uuid.UUID | None:
        """The message ``delivery_id`` belongs to, or None."""
        found: uuid.UUID | None = await self._pool.run("message_of_delivery", "fetchval",
                                                       delivery_id)
        return found

    async def messages_by_header(self, message_id_header: str) -> list[uuid.UUID]:
        """Messages whose Message-ID header is ``message_id_header`` (brackets optional)."""
        rows = await self._pool.run("messages_by_header", "fetch", message_id_header)
        return [row["id"] for row in rows]

    async def delete_with_bounce(self, ids: Sequence[int], operator: str, reason: str, *,
                                 include_uncertain: bool, head_bytes: int,
                                 bounce: Callable[[DeletedMessage], NewMessage | None]
                                 ) -> set[int]:
        """:meth:`delete`, and the DSNs ``bounce`` builds for each message's deleted
        deliveries committed in the same transaction (a deletion never lacks its DSN)."""
        sources = ["queued", "deferred", "held", *(["uncertain"] if include_uncertain else [])]
        with unavailable_on_error("delivery_operator_transition"):
            async with self._pool.connection("maintenance") as conn, conn.transaction():
                rows = await conn.fetch(
                    query("delivery_operator_transition"), list(ids), sources, "failed",
                    operator, reason, "delete", self._node, f"deleted by {operator}: {reason}",
                    timeout=self._db.commit_timeout)
                changed = {row["delivery_id"] for row in rows}
                found = await conn.fetch(query("delivery_bounce_sources"), sorted(changed),
                                         head_bytes, timeout=self._db.commit_timeout)
                by_message: dict[uuid.UUID, list[asyncpg.Record]] = {}
                for row in found:
                    by_message.setdefault(row["message_id"], []).append(row)
                for message_id, group in by_message.items():
                    dsn = bounce(DeletedMessage(
                        message_id, group[0]["mail_from"], group[0]["received_at"],
                        bytes(group[0]["trace_headers"]) + decode_head(
                            bytes(group[0]["head"]), group[0]["body_encoding"], head_bytes),
                        tuple(r["recipient"] for r in group)))
                    if dsn is not None:
                        await conn.execute(query("message_insert"),
                                           *insert_args(dsn, self._compress_above),
                                           timeout=self._db.commit_timeout)
        await self._mark_done(changed)
        return changed
