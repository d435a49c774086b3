"""Helpers for intake tests: a node for one block, the store behind a reply, closed peers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mta.config import Settings
from mta.queue import Store
from mta.queue.ids import parse_queue_id
from tests.support.nodes import NodeHandle, start_node
from tests.support.smtp import RawSMTP, queue_id_of


@contextlib.asynccontextmanager
async def running_node(settings: Settings) -> AsyncIterator[NodeHandle]:
    """A node with these settings, stopped when the block ends."""
    handle = await start_node(settings)
    try:
        yield handle
    finally:
        await handle.stop()


def store_of(node: NodeHandle) -> Store:
    """The node's open store."""
    store = node.node.store
    assert store is not None
    return store


async def stored_content(node: NodeHandle, reply: str) -> tuple[bytes, bytes]:
    """The trace headers and body stored for a ``250 … queued as <id>`` reply."""
    content = await store_of(node).message_content(parse_queue_id(queue_id_of(reply)))
    assert content is not None, f"{reply!r} but the message is not in the store"
    return content


async def greeted(port: int) -> RawSMTP:
    """A session that got a 220 greeting and a 250 to EHLO."""
    client = await RawSMTP.connect(port)
    assert client.greeting.startswith("220 "), client.greeting
    reply = await client.cmd("EHLO client.test")
    assert reply.startswith("250-"), reply
    return client


async def assert_closed_by_server(client: RawSMTP, timeout: float = 5.0) -> None:
    """The server closed the connection and sent nothing more."""
    try:
        rest = await asyncio.wait_for(client.reader.read(), timeout)
    except ConnectionResetError:
        rest = b""
    assert rest == b"", f"expected the server to close, got {rest!r}"
    await client.close()
