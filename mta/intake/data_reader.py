"""The bulk DATA reader: ends only on CRLF.CRLF, refuses bare LF and bare CR, undoes
dot-stuffing.

aiosmtpd reads DATA line by line and stops at any line that is a lone dot, which is slow
for large messages and open to SMTP smuggling. This reader scans the stream in chunks
for CRLF.CRLF only; a bare LF or bare CR anywhere refuses the message (after the whole
DATA is read), as Postfix's ``smtpd_forbid_bare_newline`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mta.intake import replies

READ_CHUNK = 256 * 1024
_END_OF_DATA = b"\r\n.\r\n"
_LINE_START_DOT = b"\r\n."


class DataOutcome:
    """The result of reading one DATA phase: the body, or the reply that refuses it and
    the reason counted for the refusal."""

    __slots__ = ("body", "reason", "refusal")

    def __init__(self, body: bytearray | None, refusal: str | None, reason: str | None) -> None:
        self.body = body
        self.refusal = refusal
        self.reason = reason


async def read_data(reader: asyncio.StreamReader, *, max_size: int, max_line: int,
                    on_chunk: Callable[[], None]) -> DataOutcome:
    """Read one DATA phase from ``reader``: scan for CRLF.CRLF in chunks, refuse only after
    the terminator, and give back what follows the dot (pipelined commands).

    Each chunk is checked and unstuffed as it arrives and appended to the body, so the
    body is the only copy of the message held, plus one chunk (I4). ``on_chunk`` is
    called per chunk read (the session's idle timer)."""
    body = _Unstuffer(max_size)
    # The CRLF of the DATA line: the body may end at once, or start with a stuffed dot.
    tail = b"\r\n"
    while True:
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            raise ConnectionResetError("connection closed during DATA")
        on_chunk()
        data = tail + chunk
        # One scan finds both a stuffed dot and the terminator, which starts like one.
        dot = data.find(_LINE_START_DOT)
        end = data.find(_END_OF_DATA, dot) if dot >= 0 else -1
        if end >= 0:
            body.feed(data, end + 2, stuffed=dot < end)
            break
        # Keep what could start the terminator, and never split a CRLF: the line and
        # dot checks then see whole line ends in one piece.
        cut = max(len(data) - len(_END_OF_DATA) + 1, 0)
        if cut and data[cut - 1] == 0x0D:
            cut -= 1
        body.feed(data, cut, stuffed=0 <= dot <= cut - len(_LINE_START_DOT))
        tail = data[cut:]
    leftover = data[end + len(_END_OF_DATA):]
    if leftover:
        # Pipelined commands after the dot belong to the command reader.
        reader._buffer[:0] = leftover  # type: ignore[attr-defined]
    return body.outcome(max_line)


class _Unstuffer:
    """The body as it is read: line ends checked and dot-stuffing undone per piece."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Starts with the DATA line's CRLF, dropped at the end (cheap at the front).
        self.buf = bytearray()
        self.size = 0
        self.too_big = False
        self.bare_newline = False
        #: The last piece ended a line: a dot starting this one is a stuffed dot.
        self.line_start = False

    def feed(self, data: bytes, stop: int, *, stuffed: bool) -> None:
        """Take ``data[:stop]``, stuffed as it came; it ends on a line end or mid-line,
        never between the CR and LF of one. ``stuffed``: a line after its first starts
        with a dot (the caller's scan found one)."""
        piece = data[:stop] if stop < len(data) else data
        if not piece:
            return
        crlf = piece.count(b"\r\n")
        if piece.count(b"\n") != crlf or piece.count(b"\r") != crlf:
            self.bare_newline = True
        ends_line = piece.endswith(b"\r\n")
        if self.line_start and piece.startswith(b"."):
            piece = piece[1:]
        self.line_start = ends_line
        if stuffed:
            piece = piece.replace(b"\r\n.", b"\r\n")
        self.size += len(piece)
        if self.size - 2 > self.limit:
            self.too_big = True
        if not (self.too_big or self.bare_newline):
            self.buf += piece

    def outcome(self, max_line: int) -> DataOutcome:
        """The body, or the refusal: too big, a bare CR or LF, or a line too long."""
        if self.too_big:
            return DataOutcome(None, replies.MESSAGE_TOO_BIG.format(limit=self.limit),
                               "too_big")
        if self.bare_newline:
            return DataOutcome(None, replies.BARE_NEWLINE, "bare_newline")
        buf = self.buf
        if has_long_line(buf, max_line):
            # Measured unstuffed: the transparency dot does not count (RFC 5321 4.5.3.1.6).
            return DataOutcome(None, replies.LINE_TOO_LONG.format(limit=max_line),
                               "line_too_long")
        del buf[:2]
        return DataOutcome(buf, None, None)


def has_long_line(data: bytearray, limit: int) -> bool:
    """True if a CRLF-terminated line in ``data`` holds more than ``limit`` octets.

    Any such line (plus its CR) covers a whole aligned window of ``(limit + 2) // 2``
    octets, so probing one LF search per window finds it without splitting the body.
    """
    width = (limit + 2) // 2
    size = len(data)
    for start in range(0, size, width):
        if data.find(b"\n", start, start + width) >= 0:
            continue
        line_start = data.rfind(b"\n", 0, start) + 1
        line_end = data.find(b"\n", start)
        line_end = size if line_end < 0 else line_end
        if line_end - line_start - 1 > limit:
            return True
    return False
