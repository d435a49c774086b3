"""The client's transaction wire: commands out, replies read back in order (RFC 2920).

aiosmtplib sets a session up (greeting, EHLO, STARTTLS, AUTH) but its protocol keeps one
reply per command it awaits: replies to a pipelined group of MAIL, RCPT and DATA arrive
together and all but the first would be lost. ``Wire.take_over`` moves the connection's
transport to a ``Wire`` once the session is set up; from then on the client writes
commands and content through it and reads each reply in the order the server sent it.
"""

from __future__ import annotations

import asyncio
import collections

from mta.mail.text import outside_text

__all__ = ["MAX_REPLY_BYTES", "ClosedByPeer", "MalformedReply", "Reply", "Wire"]

#: The longest reply (all its lines) the client reads before giving up on the server.
MAX_REPLY_BYTES = 64 * 1024
#: The longest reply line (RFC 5321 4.5.3.1.5 says 512; servers send longer texts).
MAX_LINE_BYTES = 8 * 1024


class ClosedByPeer(ConnectionError):
    """The server closed the connection, or it broke, while a reply was awaited."""


class MalformedReply(ConnectionError):
    """The server sent something that is not an SMTP reply: the session is out of step."""


class Reply:
    """One complete reply: its code and its text (lines joined by newlines, made safe by
    :func:`mta.mail.text.outside_text`)."""

    __slots__ = ("code", "text")

    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.text!r})"


class Wire(asyncio.Protocol):
    """A connection's protocol after the session setup: ordered replies, flow control."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._replies: collections.deque[Reply] = collections.deque()
        self._lines: list[bytes] = []
        self._reply_bytes = 0
        self._arrived: asyncio.Event = asyncio.Event()
        self._writable: asyncio.Event = asyncio.Event()
        self._writable.set()
        self._error: ConnectionError | None = None

    @classmethod
    def take_over(cls, transport: asyncio.Transport) -> Wire:
        """Make a new ``Wire`` the protocol of ``transport`` (no reply may be pending)."""
        wire = cls(transport)
        transport.set_protocol(wire)
        return wire

    @property
    def is_open(self) -> bool:
        """Neither side has closed the connection, and no malformed reply was read."""
        return self._error is None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        """Parse every complete reply line; wake a reader when a reply is complete."""
        self._buffer.extend(data)
        start = 0
        while self._error is None:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            self._line(bytes(self._buffer[start:end + 1]))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > MAX_LINE_BYTES:
            self._fail(MalformedReply(f"reply line longer than {MAX_LINE_BYTES} bytes"))
        self._arrived.set()

    def _line(self, line: bytes) -> None:
        code_text, separator = line[:3], line[3:4]
        if len(line) > MAX_LINE_BYTES or not code_text.isdigit() or \
                separator not in (b" ", b"-", b"\r", b"\n"):
            shown = line[:80].decode("ascii", "replace").rstrip()
            self._fail(MalformedReply(f"malformed reply line: {shown!r}"))
            return
        self._reply_bytes += len(line)
        if self._reply_bytes > MAX_REPLY_BYTES:
            self._fail(MalformedReply(f"reply longer than {MAX_REPLY_BYTES} bytes"))
            return
        self._lines.append(line[4:].strip(b" \t\r\n"))
        if separator != b"-":
            # Made safe here, where it enters (I3b): any byte, any length.
            self._replies.append(Reply(int(code_text), outside_text(b"\n".join(self._lines))))
            self._lines, self._reply_bytes = [], 0

    def _fail(self, error: ConnectionError) -> None:
        if self._error is None:
            self._error = error
        self._arrived.set()
        self._writable.set()
        self.transport.abort()

    def eof_received(self) -> bool:
        """The server closed its side: replies already read stay readable."""
        self._fail(ClosedByPeer("connection closed by the server"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone; waiting readers and writers are woken with the error."""
        detail = f": {exc}" if exc else ""
        self._fail(ClosedByPeer(f"connection lost{detail}"))

    def pause_writing(self) -> None:
        """The transport's buffer is full: ``drain`` waits."""
        self._writable.clear()

    def resume_writing(self) -> None:
        """The transport's buffer has room again."""
        self._writable.set()

    def write(self, data: bytes) -> None:
        """Queue ``data`` on the transport; a closed connection raises ``ClosedByPeer``."""
        if self._error is not None:
            raise self._error
        if self.transport.is_closing():
            raise ClosedByPeer("connection closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until the transport takes more data."""
        async with asyncio.timeout(timeout):
            await self._writable.wait()
        if self._error is not None:
            raise self._error

    async def reply(self, timeout: float) -> Reply:
        """The next reply in the order the server sent it, waiting up to ``timeout``."""
        async with asyncio.timeout(timeout):
            while not self._replies:
                if self._error is not None:
                    raise self._error
                self._arrived.clear()
                await self._arrived.wait()
        return self._replies.popleft()

    def close(self) -> None:
        """Close at once, discarding anything unsent."""
        self.transport.abort()
