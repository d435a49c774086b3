"""The accept path: what a client sends is what the store holds, after a 250."""

from __future__ import annotations

import asyncio
import os
import smtplib

import aiosmtplib
import pytest

from mta.queue.ids import parse_queue_id
from tests.support.nodes import NodeHandle
from tests.support.smtp import RawSMTP, queue_id_of


async def stored(node: NodeHandle, reply: str) -> tuple[bytes, bytes]:
    store = node.node.store
    assert store is not None
    content = await store.message_content(parse_queue_id(queue_id_of(reply)))
    assert content is not None, "a 250 must mean the message is in the store"
    return content


async def test_one_message_is_stored_with_its_envelope(node: NodeHandle) -> None:
    body = b"Subject: hello\r\nMessage-ID: <m1@client>\r\n\r\nHello world\r\n"
    client = await RawSMTP.connect(node.port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    reply = await client.submit("alice@example.org", ["bob@example.com"], body)
    await client.close()

    trace, stored_body = await stored(node, reply)
    assert stored_body == body
    assert trace.startswith(b"Received: from client.test ([127.0.0.1])")
    assert b"Message-ID" not in trace, "a Message-ID was present: none is added"
    store = node.node.store
    assert store is not None
    message_id = parse_queue_id(queue_id_of(reply))
    record = await store.message(message_id)
    assert record is not None
    assert record.mail_from == "alice@example.org"
    assert record.message_id_header == "<m1@client>"
    deliveries = await store.deliveries(message_id)
    assert [(d.recipient, d.next_hop, d.state) for d in deliveries] == [
        ("bob@example.com", "example.com", "queued")
    ]


async def test_many_recipients_make_one_delivery_each(node: NodeHandle) -> None:
    recipients = [f"user{i}@Domain{i % 3}.example" for i in range(120)]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=node.port) as client:
        errors, reply = await client.sendmail(
            "a@example.org", recipients, b"Subject: x\r\n\r\nhi\r\n"
        )
    assert errors == {}
    store = node.node.store
    assert store is not None
    message_id = parse_queue_id(reply.split()[-1])
    deliveries = await store.deliveries(message_id)
    assert sorted(d.recipient for d in deliveries) == sorted(recipients)
    assert {d.next_hop for d in deliveries} == {
        "domain0.example", "domain1.example", "domain2.example"
    }


async def test_null_sender_is_accepted(node: NodeHandle) -> None:
    client = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<>")).startswith("250 2.1.0")
    assert (await client.cmd("RCPT TO:<bob@example.com>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(b"Subject: bounce\r\n\r\nreport\r\n.\r\n")
    reply = await client.reply()
    await client.close()
    store = node.node.store
    assert store is not None
    record = await store.message(parse_queue_id(queue_id_of(reply)))
    assert record is not None and record.mail_from == ""


async def test_eight_bit_body_round_trips(node: NodeHandle) -> None:
    body = "Subject: Grüße\r\n\r\nÄÖÜ ß € 日本語\r\n".encode() + bytes(range(128, 256)) + b"\r\n"
    client = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.test")
    reply = await client.submit("a@example.org", ["b@example.com"], body)
    await client.close()
    _, stored_body = await stored(node, reply)
    assert stored_body == body


@pytest.mark.slow
async def test_ten_megabyte_body_is_byte_identical_after_dot_unstuffing(node: NodeHandle) -> None:
    random_lines = [os.urandom(300).hex().encode()[:600] for _ in range(100)]
    lines = [b"Subject: big", b""]
    size = 0
    i = 0
    while size < 10 * 1024 * 1024:
        line = random_lines[i % 100]
        if i % 7 == 0:
            line = b"." + line[:500]  # leading dots must survive stuffing and unstuffing
        if i % 11 == 0:
            line = b"."
        lines.append(line)
        size += len(line) + 2
        i += 1
    body = b"\r\n".join(lines) + b"\r\n"
    client = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.test")
    reply = await client.submit("a@example.org", ["b@example.com"], body)
    await client.close()
    _, stored_body = await stored(node, reply)
    assert stored_body == body


async def test_python_smtplib_can_submit(node: NodeHandle) -> None:
    """The README's smtplib example works against a node (blocking client in a thread)."""

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
            return client.sendmail(
                "a@example.org", ["b@example.com"], "Subject: hi\r\n\r\nbody\r\n"
            )

    assert await asyncio.to_thread(send) == {}
    store = node.node.store
    assert store is not None
    assert await store.message_count() == 1
