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

    ``on_chunk`` is called per chunk read (the session's idle timer)."""
    limit = max_size
    buf = bytearray(b"\r\n")  # the CRLF of the DATA line: the body may end at once
    scan_from = 0
    discarded = 0
    while True:
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            raise ConnectionResetError("connection closed during DATA")
        on_chunk()
        buf += chunk
        end = buf.find(_END_OF_DATA, scan_from)
        if end >= 0:
            break
        scan_from = max(len(buf) - len(_END_OF_DATA) + 1, 0)
        if len(buf) - 2 > limit:
            keep = len(_END_OF_DATA) - 1
            discarded += len(buf) - keep
            del buf[:-keep]
            scan_from = 0
    leftover = bytes(buf[end + len(_END_OF_DATA):])
    if leftover:
        # Pipelined commands after the dot belong to the command reader.
        reader._buffer[:0] = leftover  # type: ignore[attr-defined]
    del buf[end + 2:]
    if discarded or len(buf) - 2 > limit:
        return DataOutcome(None, replies.MESSAGE_TOO_BIG.format(limit=limit), "too_big")
    crlf = buf.count(b"\r\n")
    if buf.count(b"\n") != crlf or buf.count(b"\r") != crlf:
        return DataOutcome(None, replies.BARE_NEWLINE, "bare_newline")
    if b"\r\n." in buf:
        buf = buf.replace(b"\r\n.", b"\r\n")
    if has_long_line(buf, max_line):
        # Measured unstuffed: the transparency dot does not count (RFC 5321 4.5.3.1.6).
        return DataOutcome(None, replies.LINE_TOO_LONG.format(limit=max_line), "line_too_long")
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
