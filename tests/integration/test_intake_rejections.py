"""Every way intake refuses: the exact reply, and nothing stored (DESIGN.md, "Exact replies")."""

from __future__ import annotations

import re
from collections.abc import Callable

from mta.config import Settings
from mta.intake import replies
from mta.queue.ids import parse_queue_id
from tests.support.intake import (
    assert_closed_by_server,
    greeted,
    running_node,
    store_of,
    stored_content,
)
from tests.support.nodes import NodeHandle, wait_for
from tests.support.smtp import RawSMTP, dot_stuff, queue_id_of

SettingsFactory = Callable[..., Settings]
BODY = b"Subject: test\r\n\r\nhello\r\n"


async def open_transaction(client: RawSMTP, recipients: int = 1) -> None:
    """MAIL and RCPT accepted, DATA answered with 354."""
    assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.SENDER_OK
    for n in range(recipients):
        assert await client.cmd(f"RCPT TO:<bob{n}@example.com>") == replies.RECIPIENT_OK
    assert await client.cmd("DATA") == replies.START_DATA


async def send_data(client: RawSMTP, wire: bytes) -> str:
    """After 354: send the bytes as they are, then the terminator; the final reply."""
    await client.send(wire + b".\r\n")
    return await client.reply()


async def assert_session_still_accepts(node: NodeHandle, client: RawSMTP) -> None:
    """A plain message in the same session gets 250 and is stored as sent."""
    reply = await client.submit("alice@example.org", ["bob@example.com"], BODY)
    _, body = await stored_content(node, reply)
    assert body == BODY


# --- I10: access control -------------------------------------------------------------------


async def test_mail_from_a_client_outside_allowed_networks_gets_530_5_7_0(
    make_settings: SettingsFactory,
) -> None:
    async with running_node(make_settings(smtp={"allowed_networks": ["10.0.0.0/8"]})) as node:
        client = await greeted(node.port)
        assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.NOT_AUTHORISED
        assert replies.NOT_AUTHORISED.startswith("530 5.7.0 ")
        assert await client.cmd("DATA") == replies.NOT_AUTHORISED
        await client.close()
        assert await store_of(node).message_count() == 0


async def test_rcpt_from_a_client_outside_allowed_networks_gets_554_5_7_1(
    make_settings: SettingsFactory,
) -> None:
    async with running_node(make_settings(smtp={"allowed_networks": ["10.0.0.0/8"]})) as node:
        client = await greeted(node.port)
        assert await client.cmd("RCPT TO:<bob@example.com>") == replies.RELAY_DENIED
        assert replies.RELAY_DENIED.startswith("554 5.7.1 ")
        await client.close()
        assert await store_of(node).message_count() == 0


# --- addresses -----------------------------------------------------------------------------

MALFORMED_SENDERS = [
    "<no-at-sign>",
    "<alice@>",
    "<@example.org>",
    "<alice@@example.org>",
    "<alice@example..org>",
    "<alice@-example.org>",
    "<al ice@example.org>",
    "<alice@example.org",
    "<alice@example.org>junk",
    "<.alice@example.org>",
    "<alice.@example.org>",
    "<alice@exa_mple.org>",
    f"<{'a' * 65}@example.org>",
    f"<alice@{'d' * 64}.org>",
    f"<alice@{'.'.join(['a' * 63] * 4)}.org>",
]
MALFORMED_RECIPIENTS = [
    "<>", "", "<bob>", "<bob@exa mple.com>", "<bob@[1.2.3]>", '<"bob@example.com>',
]


async def test_malformed_addresses_are_refused_with_501_5_1_3(node: NodeHandle) -> None:
    assert replies.MALFORMED_ADDRESS.startswith("501 5.1.3 ")
    client = await greeted(node.port)
    for sender in MALFORMED_SENDERS:
        assert await client.cmd(f"MAIL FROM:{sender}") == replies.MALFORMED_ADDRESS, sender
    assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.SENDER_OK
    for recipient in MALFORMED_RECIPIENTS:
        assert await client.cmd(f"RCPT TO:{recipient}") == replies.MALFORMED_ADDRESS, recipient
    assert await client.cmd("DATA") == replies.NEED_RCPT
    await client.close()
    assert await store_of(node).message_count() == 0


async def test_non_ascii_addresses_get_553_5_6_7_because_smtputf8_is_not_offered(
    node: NodeHandle,
) -> None:
    client = await RawSMTP.connect(node.port)
    ehlo = await client.cmd("EHLO client.test")
    assert "SMTPUTF8" not in ehlo
    assert replies.NON_ASCII_ADDRESS.startswith("553 5.6.7 ")
    assert await client.cmd("MAIL FROM:<jörg@example.org>") == replies.NON_ASCII_ADDRESS
    assert await client.cmd("MAIL FROM:<joerg@bücher.example>") == replies.NON_ASCII_ADDRESS
    await client.send(b"MAIL FROM:<j\xf6rg@example.org>\r\n")  # Latin-1, not even UTF-8
    assert await client.reply() == replies.NON_ASCII_ADDRESS
    assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.SENDER_OK
    assert await client.cmd("RCPT TO:<日本@example.com>") == replies.NON_ASCII_ADDRESS
    assert await client.cmd("DATA") == replies.NEED_RCPT
    await client.close()
    assert await store_of(node).message_count() == 0


# --- limits ----------------------------------------------------------------------------------


async def test_recipients_beyond_max_recipients_get_452_4_5_3_and_the_first_are_kept(
    make_settings: SettingsFactory,
) -> None:
    async with running_node(make_settings(smtp={"max_recipients": 3})) as node:
        client = await greeted(node.port)
        assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.SENDER_OK
        for n in range(3):
            assert await client.cmd(f"RCPT TO:<bob{n}@example.com>") == replies.RECIPIENT_OK
        assert await client.cmd("RCPT TO:<bob3@example.com>") == replies.TOO_MANY_RECIPIENTS
        assert replies.TOO_MANY_RECIPIENTS.startswith("452 4.5.3 ")
        assert await client.cmd("DATA") == replies.START_DATA
        reply = await send_data(client, BODY)
        await client.close()
        store = store_of(node)
        deliveries = await store.deliveries(parse_queue_id(queue_id_of(reply)))
        assert sorted(d.recipient for d in deliveries) == [
            "bob0@example.com", "bob1@example.com", "bob2@example.com"
        ]
        assert await store.message_count() == 1


async def test_mail_size_parameter_over_the_limit_gets_552_5_3_4(
    make_settings: SettingsFactory,
) -> None:
    async with running_node(make_settings(smtp={"max_message_size": 1000})) as node:
        client = await greeted(node.port)
        too_big = replies.MESSAGE_TOO_BIG.format(limit=1000)
        assert too_big.startswith("552 5.3.4 ")
        assert await client.cmd("MAIL FROM:<alice@example.org> SIZE=1001") == too_big
        assert await client.cmd("MAIL FROM:<alice@example.org> SIZE=1000") == replies.SENDER_OK
        await client.close()
        assert await store_of(node).message_count() == 0


async def test_data_over_the_size_limit_gets_552_5_3_4_and_the_session_goes_on(
    make_settings: SettingsFactory,
) -> None:
    limit = 1000
    async with running_node(make_settings(smtp={"max_message_size": limit})) as node:
        too_big = replies.MESSAGE_TOO_BIG.format(limit=limit)
        client = await greeted(node.port)
        exact = b"Subject: x\r\n\r\n" + b"y" * (limit - 16) + b"\r\n"
        assert len(exact) == limit
        await open_transaction(client)
        assert (await send_data(client, exact)).startswith("250 2.0.0 Ok: queued as ")
        await open_transaction(client)
        assert await send_data(client, exact[:-2] + b"z\r\n") == too_big
        await open_transaction(client)  # far over: the reader discards as it goes
        assert await send_data(client, (b"x" * 998 + b"\r\n") * 700) == too_big
        assert await client.cmd("NOOP") == replies.OK, "no stray replies after the refusal"
        await assert_session_still_accepts(node, client)
        await client.close()
        assert await store_of(node).message_count() == 2


async def test_bare_lf_in_data_is_refused_after_the_terminator(node: NodeHandle) -> None:
    client = await greeted(node.port)
    await open_transaction(client)
    reply = await send_data(client, b"Subject: x\r\n\r\none\ntwo\r\n")
    assert reply == replies.BARE_NEWLINE
    assert reply.startswith("550 5.5.2 ")
    assert await client.cmd("NOOP") == replies.OK
    assert await store_of(node).message_count() == 0
    await assert_session_still_accepts(node, client)
    await client.close()


async def test_bare_cr_in_data_is_refused_after_the_terminator(node: NodeHandle) -> None:
    client = await greeted(node.port)
    for wire in (b"Subject: x\r\n\r\none\rtwo\r\n", b"Subject: x\r\n\r\nend\r\r\n"):
        await open_transaction(client)
        assert await send_data(client, wire) == replies.BARE_NEWLINE, wire
    assert await client.cmd("NOOP") == replies.OK
    assert await store_of(node).message_count() == 0
    await assert_session_still_accepts(node, client)
    await client.close()


async def test_received_headers_at_max_received_headers_get_554_5_4_6(
    make_settings: SettingsFactory,
) -> None:
    async with running_node(make_settings(smtp={"max_received_headers": 3})) as node:
        client = await greeted(node.port)
        hop = b"Received: from a.example by b.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        await open_transaction(client)
        reply = await send_data(client, hop * 3 + BODY)
        assert reply == replies.MAIL_LOOP
        assert reply.startswith("554 5.4.6 ")
        assert await store_of(node).message_count() == 0
        await open_transaction(client)
        below = await send_data(client, hop * 2 + BODY)
        assert below.startswith("250 2.0.0 Ok: queued as "), below
        await open_transaction(client)
        in_body = await send_data(client, BODY + hop * 5)  # only the header block counts
        assert in_body.startswith("250 2.0.0 Ok: queued as "), in_body
        await client.close()
        assert await store_of(node).message_count() == 2


async def test_data_line_longer_than_max_line_length_gets_500_5_5_2(
    make_settings: SettingsFactory,
) -> None:
    limit = 100
    async with running_node(make_settings(smtp={"max_line_length": limit})) as node:
        too_long = replies.LINE_TOO_LONG.format(limit=limit)
        assert too_long.startswith("500 5.5.2 ")
        client = await greeted(node.port)
        await open_transaction(client)
        assert await send_data(client, b"Subject: x\r\n\r\n" + b"a" * (limit + 1) + b"\r\n") == (
            too_long
        )
        await open_transaction(client)
        assert await send_data(client, b"a" * (limit + 1) + b"\r\n\r\nbody\r\n") == too_long
        assert await store_of(node).message_count() == 0
        # At the limit, and at the limit plus the transparency dot, a line is fine.
        body = b"Subject: x\r\n\r\n" + b"a" * limit + b"\r\n." + b"b" * (limit - 1) + b"\r\n"
        await open_transaction(client)
        reply = await send_data(client, dot_stuff(body))
        _, stored = await stored_content(node, reply)
        assert stored == body
        await client.close()


# --- admission -------------------------------------------------------------------------------


async def test_queue_over_max_queued_bytes_gets_452_4_3_1(make_settings: SettingsFactory) -> None:
    async with running_node(make_settings(admission={"max_queued_bytes": 1})) as node:
        client = await greeted(node.port)
        await open_transaction(client)
        reply = await send_data(client, BODY)
        assert reply == replies.STORE_FULL
        assert reply.startswith("452 4.3.1 ")
        assert await client.cmd("NOOP") == replies.OK
        await client.close()
        assert await store_of(node).message_count() == 0


async def test_free_disk_below_min_free_disk_gets_452_4_3_1(
    make_settings: SettingsFactory,
) -> None:
    async with running_node(make_settings(admission={"min_free_disk": 2**62})) as node:
        client = await greeted(node.port)
        await open_transaction(client)
        assert await send_data(client, BODY) == replies.STORE_FULL
        await client.close()
        assert await store_of(node).message_count() == 0


# --- sessions and shutdown -------------------------------------------------------------------


async def test_session_beyond_max_sessions_gets_421_4_3_2_and_is_closed(
    make_settings: SettingsFactory,
) -> None:
    async with running_node(make_settings(smtp={"max_sessions": 1})) as node:
        first = await greeted(node.port)
        second = await RawSMTP.connect(node.port)
        assert second.greeting == replies.TOO_MANY_SESSIONS
        assert second.greeting.startswith("421 4.3.2 ")
        await assert_closed_by_server(second)
        assert await first.cmd("NOOP") == replies.OK, "the first session is untouched"
        assert await first.cmd("QUIT") == replies.CLOSING
        await first.close()
        intake = node.node.intake
        assert intake is not None
        await wait_for(lambda: intake.session_count == 0, 5)
        third = await greeted(node.port)
        await third.close()


async def test_after_stop_accepting_new_sessions_get_421_4_3_2(node: NodeHandle) -> None:
    intake = node.node.intake
    assert intake is not None
    intake.stop_accepting()
    client = await RawSMTP.connect(node.port)
    assert client.greeting == replies.NOT_ACCEPTING
    assert client.greeting.startswith("421 4.3.2 ")
    await assert_closed_by_server(client)


async def test_after_stop_accepting_commands_in_open_sessions_get_421_4_3_2(
    node: NodeHandle,
) -> None:
    intake = node.node.intake
    assert intake is not None
    client = await greeted(node.port)
    assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.SENDER_OK
    intake.stop_accepting()
    assert await client.cmd("RCPT TO:<bob@example.com>") == replies.NOT_ACCEPTING
    await assert_closed_by_server(client)
    assert await store_of(node).message_count() == 0


async def test_data_in_progress_at_stop_accepting_is_committed_then_421_4_3_2(
    node: NodeHandle,
) -> None:
    intake = node.node.intake
    assert intake is not None
    client = await greeted(node.port)
    await open_transaction(client)
    await client.send(b"Subject: in flight\r\n\r\n")
    intake.stop_accepting()
    reply = await send_data(client, b"still mine\r\n")
    _, body = await stored_content(node, reply)
    assert body == b"Subject: in flight\r\n\r\nstill mine\r\n"
    assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.NOT_ACCEPTING
    await assert_closed_by_server(client)


async def test_commands_beyond_max_commands_get_421_4_7_0_and_the_connection_closes(
    make_settings: SettingsFactory,
) -> None:
    async with running_node(make_settings(smtp={"max_commands": 5})) as node:
        client = await greeted(node.port)  # EHLO is command 1
        for _ in range(4):
            assert await client.cmd("NOOP") == replies.OK
        reply = await client.cmd("NOOP")
        assert reply == replies.TOO_MANY_COMMANDS
        assert reply.startswith("421 4.7.0 ")
        await assert_closed_by_server(client)


async def test_max_commands_counts_again_from_each_accepted_message(
    make_settings: SettingsFactory,
) -> None:
    """A bulk client's session may send many messages: only commands since the last
    accepted one count (EHLO + 3 per message would pass 5 by the second message)."""
    async with running_node(make_settings(smtp={"max_commands": 5})) as node:
        client = await greeted(node.port)
        for n in range(3):
            reply = await client.submit("alice@example.org", ["bob@example.com"],
                                        f"Subject: {n}\r\n\r\nbody\r\n".encode())
            assert reply.startswith("250 "), reply
        for _ in range(5):  # five more since the last accepted message, then no more
            assert await client.cmd("NOOP") == replies.OK
        assert await client.cmd("NOOP") == replies.TOO_MANY_COMMANDS
        await assert_closed_by_server(client)


# --- capabilities and sequencing -------------------------------------------------------------


async def test_ehlo_lists_pipelining_size_8bitmime_and_enhanced_status_codes_only(
    node: NodeHandle,
) -> None:
    client = await RawSMTP.connect(node.port)
    lines = (await client.cmd("EHLO client.test")).split("\n")
    limit = int(node.settings.smtp.max_message_size)
    assert lines == [
        "250-mx.test.invalid",
        "250-PIPELINING",
        f"250-SIZE {limit}",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250 HELP",
    ]
    keywords = {line[4:].split()[0] for line in lines[1:]}
    assert not keywords & {"STARTTLS", "AUTH", "SMTPUTF8"}
    await client.close()


async def test_starttls_without_a_certificate_and_auth_without_users_are_refused(
    node: NodeHandle,
) -> None:
    client = await greeted(node.port)
    assert await client.cmd("STARTTLS") == replies.TLS_NOT_AVAILABLE
    assert (await client.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==")).startswith("502 5.5.1 ")
    assert await client.cmd("NOOP") == replies.OK
    await client.close()


async def test_help_lists_the_commands(node: NodeHandle) -> None:
    client = await greeted(node.port)
    reply = await client.cmd("HELP")
    assert reply.startswith("214 2.0.0 ")
    assert {"EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT"} <= set(reply.split())
    await client.close()


async def test_commands_out_of_sequence_get_503_5_5_1(node: NodeHandle) -> None:
    client = await RawSMTP.connect(node.port)
    assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.NEED_HELO
    assert replies.NEED_HELO.startswith("503 5.5.1 ")
    await client.cmd("EHLO client.test")
    assert await client.cmd("RCPT TO:<bob@example.com>") == replies.NEED_MAIL
    assert await client.cmd("DATA") == replies.NEED_MAIL
    assert await client.cmd("MAIL FROM:<alice@example.org>") == replies.SENDER_OK
    assert await client.cmd("DATA") == replies.NEED_RCPT
    assert await client.cmd("MAIL FROM:<carol@example.org>") == replies.NESTED_MAIL
    assert await client.cmd("RSET") == replies.RESET_OK
    assert await client.cmd("RCPT TO:<bob@example.com>") == replies.NEED_MAIL
    reply = await client.submit("alice@example.org", ["bob@example.com"], BODY)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert await client.cmd("RCPT TO:<bob@example.com>") == replies.NEED_MAIL, (
        "a committed message ends the transaction"
    )
    for reply in (replies.NEED_HELO, replies.NEED_MAIL, replies.NEED_RCPT, replies.NESTED_MAIL):
        assert reply.startswith("503 5.5.1 ")
    await client.close()
    assert await store_of(node).message_count() == 1


async def test_every_reply_after_ehlo_carries_an_enhanced_status_code(node: NodeHandle) -> None:
    """RFC 2034: once ENHANCEDSTATUSCODES is offered, aiosmtpd's own replies carry
    codes too, and an overlong command line leaves the session in step."""
    client = await greeted(node.port)
    await client.send(b"NOOP " + b"x" * 20_000 + b"\r\n")
    assert await client.reply() == replies.COMMAND_TOO_LONG
    assert await client.cmd("") == "500 5.5.2 Error: bad syntax"
    assert await client.cmd("STARTTLS") == replies.TLS_NOT_AVAILABLE
    for command in ("NOOP", "RSET", "VRFY a@b.example", "HELP", "EXPN list", "QUIT"):
        reply = await client.cmd(command)
        assert re.match(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}( |$)", reply), (command, reply)
