"""Large bodies are streamed into the store by binary COPY (issue 13, memory): the row
they give must be the row the one-statement insert gives, in one transaction."""

from __future__ import annotations

import random

import asyncpg
import pytest

from mta.errors import StoreRejected
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id
from mta.queue.message_copy import STREAM_BODY_BYTES


def message(size: int, **fields: object) -> NewMessage:
    body = bytearray(random.Random(size).randbytes(size))
    values: dict[str, object] = {
        "id": new_message_id(), "mail_from": "news@exämple.org",
        "recipients": ["a@one.example", "b@two.example", "c@one.example"],
        "trace_headers": b"Received: from h by mx.test\r\n", "body": body,
        "client_address": "127.0.0.1", "helo_name": "client.test", "auth_user": "app",
        "message_id_header": "<big@test>", **fields}
    return NewMessage(**values)  # type: ignore[arg-type]


async def row_of(db_dsn: str, message_id: object) -> dict[str, object]:
    conn = await asyncpg.connect(db_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT mail_from, size_bytes, trace_headers, body, client_address, helo_name, "
            "auth_user, message_id_header, received_at IS NOT NULL AS stamped "
            "FROM messages WHERE id = $1", message_id)
        hops = await conn.fetch("SELECT recipient, next_hop, state FROM deliveries "
                                "WHERE message_id = $1 ORDER BY id", message_id)
    finally:
        await conn.close()
    assert row is not None
    return {**dict(row), "deliveries": [tuple(h) for h in hops]}


@pytest.mark.parametrize("size", [STREAM_BODY_BYTES - 1, STREAM_BODY_BYTES,
                                  3 * STREAM_BODY_BYTES + 17, 5 * 1024 * 1024])
async def test_a_streamed_body_gives_the_same_row_as_the_one_statement_insert(
    store: Store, db_dsn: str, size: int
) -> None:
    sent = message(size)
    await store.enqueue(sent)
    row = await row_of(db_dsn, sent.id)
    assert row["body"] == bytes(sent.body)
    assert row["size_bytes"] == len(sent.trace_headers) + size
    assert row == {
        "mail_from": "news@exämple.org", "size_bytes": row["size_bytes"],
        "trace_headers": sent.trace_headers, "body": row["body"],
        "client_address": "127.0.0.1", "helo_name": "client.test", "auth_user": "app",
        "message_id_header": "<big@test>", "stamped": True,
        "deliveries": [("a@one.example", "one.example", "queued"),
                       ("b@two.example", "two.example", "queued"),
                       ("c@one.example", "one.example", "queued")]}


async def test_a_streamed_body_keeps_null_fields_null(store: Store, db_dsn: str) -> None:
    sent = message(STREAM_BODY_BYTES * 2, auth_user=None, message_id_header=None,
                   mail_from="")
    await store.enqueue(sent)
    row = await row_of(db_dsn, sent.id)
    assert (row["auth_user"], row["message_id_header"], row["mail_from"]) == (None, None, "")


async def test_a_refused_streamed_message_leaves_nothing_behind(
    store: Store, db_dsn: str
) -> None:
    """The same id twice: the second COPY fails, and its deliveries are not committed."""
    first = message(STREAM_BODY_BYTES * 2)
    await store.enqueue(first)
    again = message(STREAM_BODY_BYTES * 2, id=first.id, recipients=["z@three.example"])
    with pytest.raises(StoreRejected) as caught:
        await store.enqueue(again)
    assert "message_copy" in str(caught.value)
    row = await row_of(db_dsn, first.id)
    assert [d[0] for d in row["deliveries"]] == ["a@one.example", "b@two.example",
                                                  "c@one.example"]
