"""Bodies stored compressed (issue 13): a body from ``database.compress_bodies_above`` up to
the streaming size is kept as zstd when that saves an eighth, and every reader (delivery,
DSN heads, queue show, reroute copies, the purge) sees the body as it was received."""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg

from mta.config import Settings
from mta.queue import NewMessage, Store
from mta.queue.body_codec import MIN_SAVING
from mta.queue.handoff import HandoffSource, HandoffTarget
from mta.queue.ids import new_message_id, queue_id
from mta.queue.message_copy import STREAM_BODY_BYTES
from mta.queue.pool import SharedPool
from mta.queue.records import DeletedMessage
from tests.support.intake import store_of
from tests.support.nodes import start_node, wait_for
from tests.support.process import NodeProcess, run_mta, write_config
from tests.support.sink import Sink
from tests.support.smtp import RawSMTP

HEADERS = b"From: app@example.org\r\nTo: user@example.com\r\nSubject: statement\r\n" \
          b"Message-ID: <big@test>\r\nMIME-Version: 1.0\r\n\r\n"


def compressible_body(size: int, seed: int = 1) -> bytes:
    """Headers, then base64 of pseudo-random bytes in 76-character lines: it shrinks to
    about three quarters, as a real attachment does."""
    raw = random.Random(seed).randbytes(size * 3 // 4)
    text = base64.b64encode(raw)
    lines = [text[i:i + 76] for i in range(0, len(text), 76)]
    return (HEADERS + b"\r\n".join(lines) + b"\r\n")[:size - 2] + b"\r\n"


def incompressible_body(size: int) -> bytes:
    """Lines of pseudo-random bytes (no CR or LF): nothing for zstd to take out."""
    rng = random.Random(size)
    line = bytes(rng.choice(b"".join(bytes([b]) for b in range(256) if b not in b"\r\n."))
                 for _ in range(998))
    body = bytearray(HEADERS)
    while len(body) < size:
        body += bytes(rng.sample(line, len(line))) + b"\r\n"
    return bytes(body)


def message(body: bytes, **fields: object) -> NewMessage:
    values: dict[str, object] = {
        "id": new_message_id(), "mail_from": "app@example.org",
        "recipients": ["user@example.com"], "trace_headers": b"Received: by mx.test\r\n",
        "body": bytearray(body), "client_address": "127.0.0.1", "helo_name": "client.test",
        "auth_user": None, "message_id_header": "<big@test>", **fields}
    return NewMessage(**values)  # type: ignore[arg-type]


async def stored(db_dsn: str, message_id: uuid.UUID) -> tuple[str, int, int]:
    """(body_encoding, stored body bytes, size_bytes) of one message row."""
    conn = await asyncpg.connect(db_dsn)
    try:
        row = await conn.fetchrow("SELECT body_encoding, octet_length(body) AS stored, "
                                  "size_bytes FROM messages WHERE id = $1", message_id)
    finally:
        await conn.close()
    assert row is not None
    return row["body_encoding"], row["stored"], row["size_bytes"]


async def test_a_compressible_body_is_stored_compressed_and_delivered_byte_for_byte(
    make_settings: Callable[..., Settings], sink: Sink, db_dsn: str,
) -> None:
    body = compressible_body(300 * 1024)
    node = await start_node(make_settings(delivery={
        "enabled": True, "poll_interval": 0.2,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}]}))
    try:
        client = await RawSMTP.connect(node.port)
        await client.cmd("EHLO client.test")
        reply = await client.submit("app@example.org", ["user@example.com"], body)
        await client.close()
        assert reply.startswith("250"), reply
        await sink.wait_for_count(1, timeout=20)
        (arrived,) = sink.transactions
        assert arrived.data.endswith(body), "the body arrives as it was sent"
        (message_id,) = [m for (m,) in await _message_ids(db_dsn)]
        encoding, stored_bytes, size = await stored(db_dsn, message_id)
        assert encoding == "zstd"
        assert stored_bytes < len(body) * (1 - MIN_SAVING) and size > len(body)
        content = await store_of(node).message_content(message_id)
        assert content is not None and content[1] == body
    finally:
        await node.stop()


async def _message_ids(db_dsn: str) -> list[tuple[uuid.UUID]]:
    conn = await asyncpg.connect(db_dsn)
    try:
        return [tuple(row) for row in await conn.fetch("SELECT id FROM messages")]
    finally:
        await conn.close()


async def test_small_streamed_or_incompressible_bodies_are_stored_as_received(
    store: Store, db_dsn: str,
) -> None:
    """Under the threshold (64 KiB), from the streaming size on, or not an eighth
    smaller: each stays 'identity', and reads back as sent."""
    cases = {"small": compressible_body(60 * 1024),
             "streamed": compressible_body(STREAM_BODY_BYTES + 1024),
             "incompressible": incompressible_body(200 * 1024)}
    for name, body in cases.items():
        sent = message(body)
        await store.enqueue(sent)
        encoding, stored_bytes, _ = await stored(db_dsn, sent.id)
        assert (encoding, stored_bytes) == ("identity", len(body)), name
        content = await store.message_content(sent.id)
        assert content is not None and content[1] == body, name


async def test_compression_is_off_at_zero(
    db_dsn: str, make_settings: Callable[..., Settings],
) -> None:
    store = await Store.open(db_dsn, make_settings(database={"compress_bodies_above": 0}))
    try:
        sent = message(compressible_body(300 * 1024))
        await store.enqueue_many([sent])
        assert (await stored(db_dsn, sent.id))[0] == "identity"
    finally:
        await store.close()


async def test_dsn_heads_and_the_purge_read_a_compressed_body_as_received(
    store: Store, db_dsn: str,
) -> None:
    body = compressible_body(400 * 1024)
    sent = message(body)
    await store.enqueue_many([sent])
    assert (await stored(db_dsn, sent.id))[0] == "zstd"
    head = await store.message_head(sent.id, 100)
    assert head == (sent.trace_headers, body[:100])

    (delivery,) = await store.deliveries(sent.id)
    seen: list[DeletedMessage] = []
    deleted = await store.delete_with_bounce(
        [delivery.id], "alice", "drill", include_uncertain=False, head_bytes=200,
        bounce=lambda gone: seen.append(gone) or None)
    assert deleted == {delivery.id}
    (gone,) = seen
    assert gone.head == sent.trace_headers + body[:200]

    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("UPDATE messages SET done_at = now() - interval '2 days' "
                           "WHERE id = $1", sent.id)
    finally:
        await conn.close()
    assert await store.purge_bodies(3600.0, 10) == 1
    assert await stored(db_dsn, sent.id) == ("identity", 0, len(sent.trace_headers) + len(body))
    assert await store.message_content(sent.id) == (b"", b"")


async def test_a_body_altered_at_rest_is_held_never_sent_and_shown_as_corrupt(
    make_settings: Callable[..., Settings], sink: Sink, store: Store, db_dsn: str,
    tmp_path: Path,
) -> None:
    """One byte of a compressed body flipped in the table: the frame's checksum refuses
    it, so the delivery is held with the evidence (a retry cannot heal it) instead of
    being deferred until its lifetime ends or sent altered; the operator's tools still
    answer."""
    sent = message(compressible_body(300 * 1024))
    await store.enqueue_many([sent])
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(
            "UPDATE messages SET body = set_byte(body, octet_length(body) / 2, "
            "get_byte(body, octet_length(body) / 2) # 1) WHERE id = $1", sent.id)
    finally:
        await conn.close()
    node = await start_node(make_settings(delivery={
        "enabled": True, "poll_interval": 0.2,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}]}))
    try:
        async def held() -> bool:
            return [d.state for d in await store.deliveries(sent.id)] == ["held"]
        await wait_for(held, timeout=20)
        (delivery,) = await store.deliveries(sent.id)
        assert delivery.hold_reason is not None and "does not decode" in delivery.hold_reason
        assert delivery.attempts == 1 and sink.transactions == []
        outcomes = {sample.labels["outcome"]: sample.value
                    for metric in node.node.metrics.registry.collect()
                    for sample in metric.samples if sample.name == "mta_delivery_outcomes_total"}
        assert outcomes.get("held") == 1, outcomes
    finally:
        await node.stop()
    cli = NodeProcess.configure(tmp_path / "cli", db_dsn)
    config = str(write_config(cli.config_path, cli.sections))
    shown = await run_mta("queue", "show", queue_id(sent.id), "--body", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert "does not decode" in shown.stdout and "Traceback" not in shown.stderr


async def test_a_rerouted_copy_keeps_the_compressed_body_and_its_encoding(
    store: Store, db_dsn: str, new_database: Callable[[], str],
    make_settings: Callable[..., Settings],
) -> None:
    """The handoff copies the stored bytes with their encoding; the target decodes them."""
    body = compressible_body(250 * 1024)
    sent = message(body)
    await store.enqueue_many([sent])
    conn = await asyncpg.connect(db_dsn)
    try:
        (copy,) = await HandoffSource(conn, "run-1", 10.0).contents([sent.id])
    finally:
        await conn.close()
    assert copy.body_encoding == "zstd" and len(copy.body) < len(body)
    target_dsn = new_database()
    settings = make_settings(database={"dsn": target_dsn})
    pool = await SharedPool.open(target_dsn, settings)
    target = await Store.open(target_dsn, settings)
    try:
        found, _ = await HandoffTarget(pool, 10.0).insert("a", "run-1", [copy], [])
        assert await target.message_content(found[sent.id]) == (sent.trace_headers, body)
        assert (await stored(target_dsn, found[sent.id]))[0] == "zstd"
    finally:
        await target.close()
        await pool.close()
