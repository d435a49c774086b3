"""Session limits that need time to show: the idle timeout and the DATA slots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mta.config import Settings
from tests.support.nodes import start_node
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
