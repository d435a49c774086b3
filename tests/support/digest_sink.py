"""A recording sink for big messages: it keeps each message's header section and a
SHA-256 of its body instead of the whole bytes (300 x 5 MB would be 1.5 GB in the test),
and reads DATA in bulk instead of line by line.

``DigestSink`` is :class:`tests.support.sink.Sink` in every other way (same envelope,
Message-ID, reply and time per transaction, same RCPT rejections and mid-DATA drops).
Use it without the ``hang`` and ``drop_after_dot`` faults: those change a record's
reply after it was recorded, which the digested copy does not see.

Why bulk: aiosmtpd reads DATA with one ``readuntil`` per line, about 35 MB/s; a 5 MB
base64 message has 67,000 lines, and the sink shares the test's event loop (and CPU)
with the submitting clients. The bulk reader scans 256 KiB reads for CRLF.CRLF and
undoes dot-stuffing as aiosmtpd does (a line's leading dot is dropped). It enforces no
size or line-length limit: a sink takes what it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from aiosmtpd.smtp import MISSING

from tests.support.sink import Sink, Transaction, _SinkSMTP

READ_CHUNK = 256 * 1024
_END_OF_DATA = b"\r\n.\r\n"


@dataclass
class DigestTransaction(Transaction):
    """A recorded transaction whose ``data`` is dropped; what identifies it is kept."""

    #: The header section as received, each line with its CRLF (without the empty line).
    headers: bytes = b""
    #: SHA-256 (hex) of everything after the empty line that ends the header section.
    body_sha256: str = ""
    #: Length of the whole message data as received.
    size: int = 0


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """The header section (lines with their CRLF) and the body after the empty line."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[:end + 2], data[end + 4:]


def digested(record: Transaction) -> DigestTransaction:
    """``record`` without its data: header section, body digest and size instead."""
    headers, body = split_message(record.data)
    values = {f.name: getattr(record, f.name) for f in fields(Transaction)}
    values["data"] = b""
    return DigestTransaction(**values, headers=headers,
                             body_sha256=hashlib.sha256(body).hexdigest(),
                             size=len(record.data))


class _BulkDataSMTP(_SinkSMTP):
    """The sink's SMTP with a DATA reader that scans the stream in chunks."""

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = await self._read_data()
        if data is None:
            return  # the connection closed mid-DATA: nothing to record
        self.envelope.content = self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytes | None:
        """Everything up to CRLF.CRLF, dot-stuffing undone; None if the peer left."""
        buf = bytearray(b"\r\n")  # the DATA line's CRLF: the data may end at once
        scan_from = 0
        while True:
            chunk = await self._reader.read(READ_CHUNK)
            if not chunk:
                return None
            self._reset_timeout()
            buf += chunk
            end = buf.find(_END_OF_DATA, scan_from)
            if end >= 0:
                break
            scan_from = max(len(buf) - len(_END_OF_DATA) + 1, 0)
        leftover = bytes(buf[end + len(_END_OF_DATA):])
        if leftover:  # pipelined commands after the dot belong to the command reader
            self._reader._buffer[:0] = leftover  # type: ignore[attr-defined]
        del buf[end + 2:]
        return bytes(buf.replace(b"\r\n.", b"\r\n")[2:])


class DigestSink(Sink):
    """A ``Sink`` whose transactions are :class:`DigestTransaction` values."""

    protocol_class = _BulkDataSMTP

    async def _record(self, record: Transaction) -> None:
        await super()._record(digested(record))

    def digests(self) -> list[DigestTransaction]:
        """Every recorded transaction, typed."""
        return [t for t in self.transactions if isinstance(t, DigestTransaction)]


@contextlib.asynccontextmanager
async def running_digest_sink(**kwargs: Any) -> AsyncIterator[DigestSink]:
    """A started ``DigestSink(**kwargs)``, stopped on exit."""
    sink = DigestSink(**kwargs)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()
