"""Message content on its way to DATA: bounded chunks, CRLF line endings, dot-stuffing."""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator

#: Bytes handed to the transport per write when the content is one ``bytes`` value.
CHUNK_BYTES = 64 * 1024

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")


class DotStuffer:
    """Streams content as DATA wants it: CRLF line endings, dot-stuffed, ended by ``.``."""

    def __init__(self) -> None:
        self._held = b""  # a trailing CR that may start a CRLF in the next chunk
        self._line_start = True

    def feed(self, chunk: bytes) -> bytes:
        """The wire bytes for ``chunk``; a trailing CR waits for the next chunk."""
        data = self._held + chunk
        self._held = b""
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:  # a bare CR or LF
            data = _LINE_ENDINGS.sub(b"\r\n", data)
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        self._line_start = data.endswith(b"\n")
        return data

    def end(self) -> bytes:
        """The rest: a held CR, a final CRLF if missing, and the terminating dot."""
        tail = b"\r\n" if self._held or not self._line_start else b""
        return tail + b".\r\n"


async def chunks(content: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The content in chunks of bounded size, without copying a ``bytes`` value whole."""
    if isinstance(content, bytes):
        view = memoryview(content)
        for start in range(0, len(view), CHUNK_BYTES):
            yield bytes(view[start:start + CHUNK_BYTES])
        return
    async for chunk in content:
        yield chunk
