"""The header section of a message, as intake and the DSN builder both read it."""

from __future__ import annotations

#: Headers longer than this are not scanned further (a header block is rarely > 64 KB).
MAX_HEADER_SCAN = 256 * 1024


def header_block(body: bytes | bytearray) -> bytes:
    """The header section: everything before the first empty line (bounded)."""
    end = body.find(b"\r\n\r\n", 0, MAX_HEADER_SCAN)
    if body.startswith(b"\r\n"):
        return b""
    return bytes(body[: end + 2 if end >= 0 else MAX_HEADER_SCAN])
