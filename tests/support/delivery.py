"""Helpers for delivery tests: tagged submissions, and the delivery states a store holds."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from mta.config import Settings
from mta.queue import Store
from mta.queue.ids import parse_queue_id
from tests.support.smtp import RawSMTP, queue_id_of


async def submit_tagged(port: int, tag: str, *, sender: str = "app@example.org",
                        recipients: Sequence[str] = ("user@example.com",)) -> uuid.UUID:
    """Submit one message with ``Message-ID: <tag@test>`` in a session of its own; its
    queue id (the submission must be answered 250)."""
    client = await RawSMTP.connect(port)
    await client.cmd("EHLO client.test")
    reply = await client.submit(sender, list(recipients),
                                f"Message-ID: <{tag}@test>\r\nSubject: {tag}\r\n\r\n"
                                f"body {tag}\r\n".encode())
    await client.close()
    return parse_queue_id(queue_id_of(reply))


async def delivery_states(store: Store, message_id: uuid.UUID) -> dict[str, str]:
    """Each recipient's delivery state, for one message."""
    return {d.recipient: d.state for d in await store.deliveries(message_id)}


async def only_state(store: Store, message_id: uuid.UUID) -> str:
    """The state of a message's one delivery."""
    (delivery,) = await store.deliveries(message_id)
    return delivery.state


async def state_of(dsn: str, settings: Settings, message_id: uuid.UUID) -> str:
    """The state of a message's one delivery, read through a store of the test's own."""
    store = await Store.open(dsn, settings)
    try:
        return await only_state(store, message_id)
    finally:
        await store.close()


async def states_by_recipient(dsn: str) -> dict[str, str]:
    """Every delivery's state in the database at ``dsn``, by recipient."""
    rows = await _fetch(dsn, "SELECT recipient, state FROM deliveries")
    return {row["recipient"]: row["state"] for row in rows}


async def states_by_id(dsn: str) -> dict[int, str]:
    """Every delivery's state in the database at ``dsn``, by delivery id."""
    rows = await _fetch(dsn, "SELECT id, state FROM deliveries")
    return {row["id"]: row["state"] for row in rows}


async def last_replies(dsn: str, state: str) -> dict[int, str]:
    """The last evidence of every delivery in ``state``, by delivery id."""
    rows = await _fetch(dsn, "SELECT id, last_reply FROM deliveries WHERE state = $1", state)
    return {row["id"]: row["last_reply"] or "" for row in rows}


async def state_counts(dsn: str) -> dict[str, int]:
    """How many deliveries the database at ``dsn`` holds in each state."""
    rows = await _fetch(dsn, "SELECT state, count(*) AS n FROM deliveries GROUP BY state")
    return {row["state"]: row["n"] for row in rows}


async def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """``sql``'s rows, over a connection of the test's own (not the node's pool)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()
