"""The Postgres store: the only caller of ``queries.sql``.

Every method runs over the role-shared pool (``pool.py``), which maps driver and network
errors to :class:`StoreUnavailable`, so callers deal in the project's error tree only.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime

import asyncpg

from mta.config import Settings
from mta.errors import StaleTerm, StoreUnavailable
from mta.queue.body_codec import decode, decode_head
from mta.queue.message_copy import COLUMNS, STREAM_BODY_BYTES, insert_args, message_row
from mta.queue.pool import SharedPool, unavailable_on_error
from mta.queue.records import (
    FINAL_STATES,
    PENDING_STATES,
    AttemptOutcome,
    AuditRecord,
    ClaimedDelivery,
    DeliveryRecord,
    Envelope,
    MessageRecord,
    NewMessage,
    NodeMode,
    NodeModeName,
    QueueStats,
    SetAside,
    SetAsideRecord,
    recipient_next_hop,
)
from mta.queue.server import STORE_ERRORS
from mta.queue.sql import query
from mta.queue.store_queue import QueueTools

#: The channel intake notifies and delivery workers listen on.
NEW_WORK_CHANNEL = "mta_new_work"
#: The channel a mode change is announced on (the payload is the node's name).
NODE_MODE_CHANNEL = "mta_node_mode"
#: The start of time, for "since" filters that were not given.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _claimed(row: asyncpg.Record) -> ClaimedDelivery:
    return ClaimedDelivery(
        row["id"], row["message_id"], row["recipient"], row["next_hop"], row["attempts"],
        Envelope(row["message_id"], row["mail_from"], row["received_at"],
                 row["message_id_header"], row["size_bytes"]))


class Store(QueueTools):
    """One node process's view of its store, over a pool sized by the budget (I6)."""

    def __init__(self, pool: SharedPool, settings: Settings) -> None:
        self._pool = pool
        self._db = settings.database
        self._node = settings.node.name
        self._compress_above = int(settings.database.compress_bodies_above)

    @classmethod
    async def open(cls, dsn: str, settings: Settings) -> Store:
        """Open the pool; it holds at most ``workers + intake_db_slots + 2`` connections."""
        return cls(await SharedPool.open(dsn, settings), settings)

    async def close(self) -> None:
        """Close every connection, waiting at most the commit timeout."""
        await self._pool.close()

    @property
    def pool_size(self) -> int:
        """Connections the pool may open."""
        return self._pool.size

    @property
    def pool_in_use(self) -> int:
        """Connections currently checked out of the pool."""
        return self._pool.in_use

    def intake_slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold one of ``intake_db_slots``; waiting longer than the acquire timeout fails."""
        return self._pool.slot("intake")

    async def enqueue_many(self, messages: Sequence[NewMessage]) -> None:
        """Commit small messages and their deliveries in one transaction, pipelined in
        one round trip (group commit at intake); all or none."""
        with unavailable_on_error("message_insert"):
            async with self._pool.connection("intake") as conn:
                await conn.executemany(query("message_insert"),
                                       [insert_args(m, self._compress_above)
                                        for m in messages],
                                       timeout=self._db.commit_timeout)

    async def enqueue(self, message: NewMessage) -> None:
        """Commit a message and its deliveries durably, or raise ``StoreUnavailable``.

        A large body is streamed in by COPY (see :mod:`mta.queue.message_copy`) rather
        than copied whole into the driver's buffer; both commit in one transaction."""
        if len(message.body) < STREAM_BODY_BYTES:
            await self._pool.run("message_insert", "execute",
                                 *insert_args(message, self._compress_above), share="intake")
            return
        timeout = self._db.commit_timeout
        with unavailable_on_error("message_copy"):
            async with self._pool.connection("intake") as conn, conn.transaction():
                await conn.copy_to_table("messages", source=message_row(message),
                                         columns=COLUMNS, format="binary", timeout=timeout)
                await conn.execute(query("deliveries_insert_for_message"), message.id,
                                   list(message.recipients),
                                   [recipient_next_hop(r) for r in message.recipients],
                                   timeout=timeout)

    async def queue_stats(self) -> QueueStats:
        """Deliveries with work left per state, the due lag and the oldest message's age."""
        row = await self._pool.run("queue_stats", "fetchrow", share="maintenance")
        return QueueStats(
            by_state={state: int(row[state]) for state in PENDING_STATES},
            expired_leases=int(row["expired_leases"]),
            due_lag_s=float(row["due_lag_s"]), oldest_message_s=float(row["oldest_message_s"]),
            delivered_last_minute=int(row["delivered_last_minute"]),
            rerouted_out_last_minute=int(row["rerouted_out_last_minute"]),
            rerouted_in_last_minute=int(row["rerouted_in_last_minute"]))

    async def queue_by_destination(self, limit: int = 100) -> list[tuple[str, str, int]]:
        """(next hop, state, count) of the deliveries with work left, largest first."""
        rows = await self._pool.run("queue_by_destination", "fetch", limit)
        return [(row["next_hop"], row["state"], int(row["count"])) for row in rows]

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the server answers."""
        await self._pool.run("ping", "fetchval", share="maintenance")

    async def queued_bytes(self) -> int:
        """Bytes of messages that still have deliveries to make."""
        return int(await self._pool.run("message_queued_bytes", "fetchval", share="maintenance"))

    async def claim_due(
        self, owner: str, limit: int, lease_seconds: float,
        room: Mapping[str, int] | None = None,
    ) -> list[ClaimedDelivery]:
        """Lease due deliveries to ``owner``: the first ``limit``, with at most
        ``room[hop]`` messages for a next hop listed there (0 skips it), and the due
        siblings of their messages at the same next hop (so a claim may return more than
        ``limit``). Locked rows are skipped."""
        hops = dict(room or {})
        rows = await self._pool.run("delivery_claim_due", "fetch", owner, limit, lease_seconds,
                                    list(hops), list(hops.values()))
        return [_claimed(row) for row in rows]

    async def claim_suspect(self, owner: str, lease_seconds: float, crashes: int,
                            window_s: float) -> ClaimedDelivery | None:
        """Lease one due suspect of the crash-loop breaker to ``owner``, alone: a
        delivery in flight at ``crashes`` or more deaths within ``window_s``."""
        rows = await self._pool.run("delivery_claim_suspect", "fetch", owner, lease_seconds,
                               crashes, window_s)
        return _claimed(rows[0]) if rows else None

    async def exonerate(self, delivery_id: int) -> None:
        """Clear a suspect whose attempt ran alone without a death."""
        await self._pool.run("delivery_exonerate", "execute", delivery_id)

    async def message(self, message_id: uuid.UUID) -> MessageRecord | None:
        """One message's envelope and metadata, or None."""
        row = await self._pool.run("message_get", "fetchrow", message_id)
        return MessageRecord(**dict(row)) if row is not None else None

    async def message_content(self, message_id: uuid.UUID) -> tuple[bytes, bytes] | None:
        """One message's added trace headers and its body as received, or None."""
        row = await self._pool.run("message_content", "fetchrow", message_id)
        if row is None:
            return None
        return bytes(row["trace_headers"]), decode(bytes(row["body"]), row["body_encoding"])

    async def message_head(self, message_id: uuid.UUID,
                           limit: int) -> tuple[bytes, bytes] | None:
        """Trace headers and the first ``limit`` bytes of the body, or None."""
        row = await self._pool.run("message_head", "fetchrow", message_id, limit)
        if row is None:
            return None
        return bytes(row["trace_headers"]), decode_head(bytes(row["head"]),
                                                        row["body_encoding"], limit)

    async def deliveries(self, message_id: uuid.UUID) -> list[DeliveryRecord]:
        """Every delivery of one message."""
        rows = await self._pool.run("delivery_list_for_message", "fetch", message_id)
        return [DeliveryRecord(**dict(row)) for row in rows]

    async def message_count(self) -> int:
        """How many messages the store holds."""
        return int(await self._pool.run("message_count", "fetchval"))

    async def renew_leases(self, owner: str, delivery_ids: Sequence[int],
                           lease_seconds: float) -> set[int]:
        """Extend ``owner``'s leases; returns the ids still held (others were lost)."""
        rows = await self._pool.run("delivery_renew_leases", "fetch", owner, list(delivery_ids),
                               lease_seconds)
        return {row["id"] for row in rows}

    async def record_outcomes(self, owner: str, outcomes: Sequence[AttemptOutcome], *,
                              bounce: NewMessage | None = None) -> set[int]:
        """Apply outcomes to deliveries ``owner`` still leases; returns the ids applied.

        Applying the same outcome twice changes nothing the second time (the delivery is
        no longer leased), so a journal replay may repeat what already reached the store.
        ``bounce``, the DSN for the ``failed`` outcomes, commits in the same transaction,
        and only when every one of them is applied now: a failure never lacks its DSN,
        and a repeat never queues a second one (I3).
        """
        failed = {o.delivery_id for o in outcomes if o.state == "failed"}
        args = (owner, [o.delivery_id for o in outcomes], [o.state for o in outcomes],
                [o.reply_code for o in outcomes], [o.reply for o in outcomes],
                [o.retry_in_s for o in outcomes], [o.possible_duplicate for o in outcomes],
                [o.host for o in outcomes], [o.started_at for o in outcomes],
                [o.dot_at for o in outcomes], [o.reply_lost_at for o in outcomes])
        if bounce is None or not failed:
            rows = await self._pool.run("delivery_record_outcomes", "fetch", *args)
            applied = {row["delivery_id"] for row in rows}
        else:
            timeout = self._db.commit_timeout
            with unavailable_on_error("delivery_record_outcomes"):
                async with self._pool.connection("delivery") as conn, conn.transaction():
                    rows = await conn.fetch(query("delivery_record_outcomes"), *args,
                                            timeout=timeout)
                    applied = {row["delivery_id"] for row in rows}
                    if failed <= applied:
                        await conn.execute(query("message_insert"),
                                           *insert_args(bounce, self._compress_above),
                                           timeout=timeout)
        finished = {row["delivery_id"] for row in rows if row["message_done"]}
        # The statement marks most messages done itself. The rest: those with a sibling
        # that a concurrent statement finished, and repeats of outcomes whose first write
        # committed just before the store failed (nothing applied now, but their messages
        # must still be finished).
        await self._mark_done({o.delivery_id for o in outcomes
                               if o.state in FINAL_STATES and o.delivery_id not in finished})
        return applied

    async def set_aside(self, record: SetAside) -> int:
        """Keep ``record`` (outcomes the store refused) and make its deliveries that
        ``record.owner`` still leases uncertain; the kept record's id."""
        return int(await self._pool.run(
            "set_aside_record", "fetchval", record.source, record.owner, record.attempt_id,
            list(record.delivery_ids), record.reason, record.raw))

    async def set_aside_records(self, limit: int = 1000) -> list[SetAsideRecord]:
        """The records set aside, newest first."""
        rows = await self._pool.run("set_aside_list", "fetch", limit)
        return [SetAsideRecord(**dict(row)) for row in rows]

    async def give_back(self, owner: str, delivery_ids: Sequence[int]) -> set[int]:
        """Return ``owner``'s leases unattempted, due as before; the ids given back."""
        rows = await self._pool.run("delivery_give_back", "fetch", owner, list(delivery_ids))
        return {row["id"] for row in rows}

    async def release_unsent(self, owner: str, delivery_ids: Sequence[int], reason: str, *,
                             crash_limit: int = 3, crash_window_s: float = 3600.0) -> set[int]:
        """Requeue deliveries a dead ``owner`` leased but certainly never sent.

        Each release counts a death with the delivery in flight; the ``crash_limit``-th
        within ``crash_window_s`` holds it with the reason ``crash-loop`` instead, when it
        was the owner's only lease (alone in flight: the death is pinned on it).
        """
        rows = await self._pool.run("delivery_release_unsent", "fetch", owner, list(delivery_ids),
                               reason, crash_limit, crash_window_s, len(delivery_ids) == 1)
        return {row["delivery_id"] for row in rows}

    async def node_mode(self, node: str) -> NodeMode | None:
        """``node``'s mode in this store, or None when none was ever set (active)."""
        row = await self._pool.run("node_mode_get", "fetchrow", node, share="maintenance")
        return NodeMode(**dict(row)) if row is not None else None

    async def set_node_mode(self, node: str, mode: NodeModeName, reason: str,
                            operator: str, term: int | None = None) -> NodeMode:
        """Set ``node``'s mode (the node follows its store), audited. A controller passes
        its ``term``: ``StaleTerm`` when the node accepted a newer one."""
        row = await self._pool.run("node_mode_set", "fetchrow", node, mode, reason, operator,
                                   term)
        if row is None:
            current = await self.node_mode(node)
            raise StaleTerm(f"term {term} is older than term "
                            f"{current.term if current else '?'} that {node} accepted")
        return NodeMode(**dict(row))

    async def audit_records(self, limit: int = 1000,
                            since: datetime | None = None) -> list[AuditRecord]:
        """The node's audit trail, newest first (since ``since``, when given)."""
        rows = await self._pool.run("audit_list", "fetch", limit, since or _EPOCH)
        return [AuditRecord(**{**dict(row), "counts": json.loads(row["counts"])})
                for row in rows]

    async def record_audit(self, action: str, operator: str, reason: str, result: str,
                           counts: Mapping[str, int]) -> None:
        """Append an action on this node (a fleet command's, or one of its own)."""
        await self._pool.run("audit_insert", "execute", self._node, operator, action, reason,
                             result, json.dumps(dict(counts)), share="maintenance")

    async def purge_audit(self, older_than_s: float, limit: int) -> int:
        """Delete audit records older than ``older_than_s``; returns how many."""
        status = await self._pool.run("audit_purge", "execute", older_than_s, limit)
        return int(str(status).rsplit(" ", 1)[-1])

    async def lease_owners(self, pattern: str) -> dict[str, list[int]]:
        """Owners matching the LIKE ``pattern`` that hold leases, with their delivery ids."""
        rows = await self._pool.run("delivery_lease_owners", "fetch", pattern)
        return {row["lease_owner"]: list(row["ids"]) for row in rows}

    async def register_journal_owner(self, owner: str, journal_id: str) -> None:
        """Record that ``owner`` writes its journal to the directory ``journal_id``."""
        await self._pool.run("journal_owner_register", "execute", owner, journal_id)

    async def journal_owners(self, owners: Sequence[str]) -> dict[str, str]:
        """The registered journal identity of each of ``owners`` that has one."""
        rows = await self._pool.run("journal_owners_get", "fetch", list(owners))
        return {row["owner"]: row["journal_id"] for row in rows}

    async def purge_journal_owners(self, older_than_s: float, limit: int) -> int:
        """Forget owners registered longer ago than ``older_than_s`` that hold no lease."""
        status = await self._pool.run("journal_owner_purge", "execute", older_than_s, limit)
        return int(str(status).rsplit(" ", 1)[-1])

    async def purge_bodies(self, older_than_s: float, limit: int) -> int:
        """Drop bodies of messages done for longer than ``older_than_s``; returns how many."""
        status = await self._pool.run("message_purge_bodies", "execute", older_than_s, limit)
        return int(str(status).rsplit(" ", 1)[-1])

    async def purge_messages(self, older_than_s: float, limit: int) -> int:
        """Delete messages done for longer than ``older_than_s``; returns how many."""
        status = await self._pool.run("message_purge", "execute", older_than_s, limit)
        return int(str(status).rsplit(" ", 1)[-1])

    async def notify_new_work(self, source: str) -> None:
        """Wake delivery workers that listen on this store (any process, any node)."""
        await self._pool.run("deliveries_notify", "execute", source, share="maintenance")

    @contextlib.asynccontextmanager
    async def listening(self, on_new_work: Callable[[], None],
                        on_mode_change: Callable[[], None]
                        ) -> AsyncIterator[Callable[[], bool]]:
        """Hold one pool connection (a fixed one of the budget) listening for new work
        and for mode changes.

        Yields a function that tells whether the connection is still open, so the caller
        can listen again after the store comes back.
        """
        async with self._pool.connection("maintenance") as conn:
            def callback(*_: object) -> None:
                on_new_work()

            def mode_callback(*_: object) -> None:
                on_mode_change()

            try:
                await conn.add_listener(NEW_WORK_CHANNEL, callback)
                await conn.add_listener(NODE_MODE_CHANNEL, mode_callback)
            except STORE_ERRORS as exc:
                raise StoreUnavailable(f"cannot listen: {exc}") from exc
            def is_open() -> bool:
                try:
                    return not conn.is_closed()
                except asyncpg.InterfaceError:  # lost, so the pool took the proxy back
                    return False

            try:
                yield is_open
            finally:
                if is_open():
                    with contextlib.suppress(*STORE_ERRORS):
                        await conn.remove_listener(NEW_WORK_CHANNEL, callback)
                        await conn.remove_listener(NODE_MODE_CHANNEL, mode_callback)
