"""Raw SMTP over asyncio streams: exact bytes out, exact replies back."""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class RawSMTP:
    """A minimal SMTP client that sends exactly what the test gives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = ""

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1",
                      ssl_context: ssl.SSLContext | None = None,
                      source: str | None = None) -> RawSMTP:
        """Connect (from the loopback address ``source``, if given) and read the greeting."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context,
                                    server_hostname=host if ssl_context else None,
                                    local_addr=(source, 0) if source else None,
                                    limit=1 << 20), 10)
        client = cls(reader, writer)
        client.greeting = await client.reply()
        return client

    async def reply(self, timeout: float = 15.0) -> str:
        """Read one (possibly multi-line) reply; returns its lines joined by newlines."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("server closed the connection")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> str:
        """Send one command line and return its reply."""
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def submit(self, mail_from: str, recipients: list[str], data: bytes) -> str:
        """EHLO is assumed done: MAIL, RCPT…, DATA and the dot-stuffed body; final reply."""
        reply = await self.cmd(f"MAIL FROM:<{mail_from}>")
        assert reply.startswith("250"), reply
        for rcpt in recipients:
            reply = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.startswith("250"), reply
        reply = await self.cmd("DATA")
        assert reply.startswith("354"), reply
        await self.send(dot_stuff(data) + b".\r\n")
        return await self.reply()

    async def close(self) -> None:
        """Close without QUIT."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def dot_stuff(body: bytes) -> bytes:
    """Prepare a CRLF body for DATA: double leading dots and end with CRLF."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = b"\r\n" + body
    return stuffed.replace(b"\r\n.", b"\r\n..")[2:]


def queue_id_of(reply: str) -> str:
    """The queue id in ``250 2.0.0 Ok: queued as <id>``."""
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]
