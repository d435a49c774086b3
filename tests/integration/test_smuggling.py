"""SMTP smuggling: DATA ends only at CRLF.CRLF, and dot-stuffing survives the round trip."""

from __future__ import annotations

import pytest

from mta.intake import replies
from mta.queue.ids import parse_queue_id
from tests.support.intake import greeted, store_of, stored_content
from tests.support.nodes import NodeHandle
from tests.support.smtp import RawSMTP, queue_id_of

SMUGGLED = (
    b"MAIL FROM:<admin@example.org>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: admin@example.org\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"this message must never be accepted\r\n"
)
# End-of-data look-alikes that some receivers accept (SEC Consult, 2023).
FAKE_TERMINATORS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\n.\r"]


async def open_data(client: RawSMTP) -> None:
    assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.SENDER_OK
    assert await client.cmd("RCPT TO:<bob@example.com>") == replies.RECIPIENT_OK
    assert await client.cmd("DATA") == replies.START_DATA


@pytest.mark.parametrize("fake", FAKE_TERMINATORS, ids=repr)
async def test_smuggled_message_after_a_fake_terminator_is_refused_whole(
    node: NodeHandle, fake: bytes
) -> None:
    client = await greeted(node.port)
    await open_data(client)
    await client.send(b"Subject: cover\r\n\r\ninnocent" + fake + SMUGGLED + b".\r\n")
    reply = await client.reply()
    assert reply == replies.BARE_NEWLINE
    assert reply.startswith("550 5.5.2 ")
    # Had the server ended DATA early, the smuggled commands' replies would come next.
    assert await client.cmd("NOOP") == replies.OK
    assert await store_of(node).message_count() == 0

    body = b"Subject: after\r\n\r\nthe session is still usable\r\n"
    _, stored = await stored_content(
        node, await client.submit("alice@example.org", ["bob@example.com"], body)
    )
    assert stored == body
    assert await client.cmd("QUIT") == replies.CLOSING
    await client.close()
    assert await store_of(node).message_count() == 1, "no second, smuggled message"


async def test_commands_pipelined_after_the_terminator_are_processed_as_commands(
    node: NodeHandle,
) -> None:
    client = await greeted(node.port)
    await open_data(client)
    first = b"Subject: one\r\n\r\nfirst\r\n"
    second = b"Subject: two\r\n\r\nsecond\r\n"
    await client.send(
        first + b".\r\n"
        b"MAIL FROM:<carol@example.org>\r\nRCPT TO:<dave@example.com>\r\nDATA\r\n"
    )
    first_reply = await client.reply()
    assert first_reply.startswith("250 2.0.0 Ok: queued as ")
    assert await client.reply() == replies.SENDER_OK
    assert await client.reply() == replies.RECIPIENT_OK
    assert await client.reply() == replies.START_DATA
    await client.send(second + b".\r\nNOOP\r\n")
    second_reply = await client.reply()
    assert await client.reply() == replies.OK
    await client.close()

    assert (await stored_content(node, first_reply))[1] == first
    assert (await stored_content(node, second_reply))[1] == second
    record = await store_of(node).message(parse_queue_id(queue_id_of(second_reply)))
    assert record is not None and record.mail_from == "carol@example.org"
    assert await store_of(node).message_count() == 2


async def test_a_command_split_across_writes_after_the_terminator_is_reassembled(
    node: NodeHandle,
) -> None:
    client = await greeted(node.port)
    await open_data(client)
    await client.send(b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FR")
    assert (await client.reply()).startswith("250 2.0.0 Ok: queued as ")
    await client.send(b"OM:<carol@example.org>\r\n")
    assert await client.reply() == replies.SENDER_OK
    await client.close()


async def test_a_terminator_split_across_writes_still_ends_data(node: NodeHandle) -> None:
    client = await greeted(node.port)
    body = b"Subject: split\r\n\r\nbody\r\n"
    for head, tail in ((b"", b".\r\n"), (b".", b"\r\n"), (b".\r", b"\n")):
        await open_data(client)
        await client.send(body + head)
        await client.send(tail)
        _, stored = await stored_content(node, await client.reply())
        assert stored == body, (head, tail)
    await client.close()


# --- dot-stuffing ----------------------------------------------------------------------------

DOTTED_BODIES = {
    "leading dots": b"Subject: dots\r\n\r\n.one\r\n..two\r\n...\r\n.\r\nend\r\n",
    "first line is a dot line": b".starts with a dot\r\n\r\nbody\r\n",
    "just a dot": b".\r\n",
    "two dot lines": b".\r\n.\r\n",
    "dots in mid line are untouched": b"Subject: x\r\n\r\na.b\r\n a .\r\nx..\r\n",
}


@pytest.mark.parametrize("body", DOTTED_BODIES.values(), ids=DOTTED_BODIES.keys())
async def test_dot_stuffed_body_is_stored_unstuffed(node: NodeHandle, body: bytes) -> None:
    client = await greeted(node.port)
    reply = await client.submit("alice@example.org", ["bob@example.com"], body)
    await client.close()
    _, stored = await stored_content(node, reply)
    assert stored == body


async def test_empty_body_is_stored_empty_with_a_message_id_added(node: NodeHandle) -> None:
    client = await greeted(node.port)
    await open_data(client)
    await client.send(b".\r\n")
    reply = await client.reply()
    await client.close()
    trace, stored = await stored_content(node, reply)
    assert stored == b""
    assert b"\r\nMessage-ID: <" in trace

