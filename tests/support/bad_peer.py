"""A misbehaving SMTP server on loopback: a scripted greeting and replies, nothing else.

For the failures a real MTA shows before a transaction starts: a ``421`` or ``554``
greeting, silence instead of a greeting, EHLO and HELO refused. Replies come from
``replies`` by command verb (``EHLO``, ``HELO``, ...); any other command gets ``250 ok``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field


@dataclass
class BadPeer:
    """What the peer says; ``sessions`` counts the connections it took."""

    greeting: str | None = "220 bad.peer.test ESMTP"
    replies: Mapping[str, str] = field(default_factory=dict)
    sessions: int = 0
    #: Every line the peer read, in order.
    lines: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection: the greeting, then one reply per command line."""
        self.sessions += 1
        try:
            if self.greeting is None:
                await reader.read()  # silent until the client gives up
                return
            writer.write(self.greeting.encode() + b"\r\n")
            await writer.drain()
            if not self.greeting.startswith("2"):
                return
            while line := await reader.readline():
                self.lines.append(line.rstrip(b"\r\n"))
                verb = line.split(b" ", 1)[0].strip().upper().decode(errors="replace")
                writer.write(self.replies.get(verb, "250 ok").encode() + b"\r\n")
                await writer.drain()
                if verb == "QUIT":
                    return
        except ConnectionError:
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def running_bad_peer(peer: BadPeer, host: str, port: int) -> AsyncIterator[BadPeer]:
    """``peer`` listening on ``host:port`` (a loopback address) until the block ends."""
    server = await asyncio.start_server(peer.handle, host, port)
    try:
        yield peer
    finally:
        server.close()
        await server.wait_closed()
