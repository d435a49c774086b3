"""Session limits that need time to show: the idle timeout and the DATA slots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mta.config import Settings
from mta.intake import replies
from tests.support.nodes import start_node, wait_for
from tests.support.smtp import RawSMTP


async def test_idle_session_gets_421_4_4_2_and_is_closed(
    make_settings: Callable[..., Settings],
) -> None:
    handle = await start_node(make_settings(smtp={"idle_timeout": 0.5}))
    try:
        client = await RawSMTP.connect(handle.port)
        assert (await client.cmd("EHLO client.test")).startswith("250")
        started = time.monotonic()
        reply = await client.reply(timeout=10)
        assert reply.startswith("421 4.4.2"), reply
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        assert time.monotonic() - started < 5
        await client.close()
    finally:
        await handle.stop()


async def test_data_beyond_data_concurrency_gets_451_4_3_0_then_recovers(
    make_settings: Callable[..., Settings],
) -> None:
    handle = await start_node(make_settings(
        smtp={"data_concurrency": 1}, database={"acquire_timeout": 0.5}
    ))
    try:
        holder = await RawSMTP.connect(handle.port)
        await holder.cmd("EHLO holder.test")
        await holder.cmd("MAIL FROM:<a@example.org>")
        await holder.cmd("RCPT TO:<b@example.com>")
        assert (await holder.cmd("DATA")).startswith("354")
        await holder.send(b"Subject: first\r\n\r\npart of the body\r\n")

        second = await RawSMTP.connect(handle.port)
        await second.cmd("EHLO second.test")
        await second.cmd("MAIL FROM:<a@example.org>")
        await second.cmd("RCPT TO:<b@example.com>")
        assert (await second.cmd("DATA")).startswith("451 4.3.0")

        await holder.send(b"the rest\r\n.\r\n")
        assert (await holder.reply()).startswith("250 2.0.0")
        reply = await second.submit("a@example.org", ["b@example.com"], b"Subject: 2\r\n\r\nx\r\n")
        assert reply.startswith("250 2.0.0"), reply
        store = handle.node.store
        assert store is not None
        assert await store.message_count() == 2
        await holder.close()
        await second.close()
    finally:
        await handle.stop()


async def test_one_client_address_cannot_hold_every_session(
    make_settings: Callable[..., Settings],
) -> None:
    """``smtp.max_sessions_per_client``: the next session from a full address gets
    ``421 4.7.0``; other addresses are greeted, and a closed session frees its place."""
    handle = await start_node(make_settings(smtp={"max_sessions_per_client": 2}))
    try:
        held = [await RawSMTP.connect(handle.port) for _ in range(2)]
        assert all(c.greeting.startswith("220 ") for c in held)
        refused = await RawSMTP.connect(handle.port)
        assert refused.greeting == replies.TOO_MANY_FROM_CLIENT
        await refused.close()
        other = await RawSMTP.connect(handle.port, source="127.0.0.2")
        assert other.greeting.startswith("220 "), "another address is not limited"
        await held[0].cmd("QUIT")
        await held[0].close()

        async def greeted_again() -> bool:
            client = await RawSMTP.connect(handle.port)
            await client.close()
            return client.greeting.startswith("220 ")

        await wait_for(greeted_again, timeout=5)
        for client in (held[1], other):
            await client.close()
    finally:
        await handle.stop()
