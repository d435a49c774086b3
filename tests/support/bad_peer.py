"""A misbehaving SMTP server on loopback: a scripted greeting and replies, nothing else.

For the failures a real MTA shows: a ``421`` or ``554`` greeting, silence instead of a
greeting, EHLO and HELO refused, and replies holding any bytes at all. Replies come from
``replies`` by command verb (``EHLO``, ``HELO``, ``RCPT``, ...), as text or raw bytes;
any other command gets ``250 ok``. After a ``354`` reply to DATA the peer reads the
content up to the final dot and answers it with ``replies["."]`` (default ``250 ok``).
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
    replies: Mapping[str, str | bytes] = field(default_factory=dict)
    sessions: int = 0
    #: Every line the peer read, in order (content lines included).
    lines: list[bytes] = field(default_factory=list)
    #: How many messages' content it read to the final dot.
    contents: int = 0

    def _reply(self, verb: str) -> bytes:
        reply = self.replies.get(verb, "250 ok")
        return (reply if isinstance(reply, bytes) else reply.encode()) + b"\r\n"

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
                reply = self._reply(verb)
                writer.write(reply)
                await writer.drain()
                if verb == "DATA" and reply.startswith(b"354"):
                    while (content := await reader.readline()) not in (b".\r\n", b""):
                        self.lines.append(content.rstrip(b"\r\n"))
                    self.contents += 1
                    writer.write(self._reply("."))
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
