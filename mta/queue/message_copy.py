"""A message's row as intake commits it: the one-statement insert's parameters, and for
a large message the row for ``COPY messages FROM STDIN (FORMAT binary)``, as a stream.

``message_insert`` sends the body as one statement parameter, and the driver copies the
whole of it into its send buffer first: a second copy of every message in flight. For
large bodies the store streams the row instead, the body a slice at a time, so the only
whole copy is intake's own (I4). The row format is
PostgreSQL's binary COPY format: a signature, then per field a length and its bytes.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

from mta.config.budget import STREAM_BODY_BYTES
from mta.queue.body_codec import encode
from mta.queue.records import NewMessage, recipient_next_hop

__all__ = ["COLUMNS", "STREAM_BODY_BYTES", "insert_args", "message_row"]

#: Bytes of the body handed to the driver at a time.
SLICE_BYTES = 256 * 1024

#: The columns the row fills, in its field order; the rest take their defaults (a
#: streamed body is stored as received: ``body_encoding`` 'identity').
COLUMNS = ("id", "mail_from", "size_bytes", "trace_headers", "body", "client_address",
           "helo_name", "auth_user", "message_id_header")

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_TRAILER = struct.pack("!h", -1)


def _field(value: bytes | None) -> bytes:
    if value is None:
        return struct.pack("!i", -1)
    return struct.pack("!i", len(value)) + value


def _text(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8")


async def message_row(message: NewMessage) -> AsyncIterator[bytes]:
    """The COPY stream of ``message``'s row: header fields, then the body in slices."""
    size = len(message.trace_headers) + len(message.body)
    yield (_SIGNATURE + struct.pack("!h", len(COLUMNS)) + _field(message.id.bytes)
           + _field(message.mail_from.encode("utf-8")) + _field(struct.pack("!q", size))
           + _field(bytes(message.trace_headers)) + struct.pack("!i", len(message.body)))
    view = memoryview(message.body)
    for start in range(0, len(view), SLICE_BYTES):
        yield bytes(view[start:start + SLICE_BYTES])
    yield (_field(message.client_address.encode("utf-8"))
           + _field(message.helo_name.encode("utf-8")) + _field(_text(message.auth_user))
           + _field(_text(message.message_id_header)) + _TRAILER)


def insert_args(message: NewMessage, compress_above: int) -> tuple[Any, ...]:
    """The parameters of ``message_insert`` for ``message``, its body stored as
    :func:`mta.queue.body_codec.encode` decides."""
    body, encoding = encode(message.body, compress_above)
    return (message.id, message.mail_from, len(message.trace_headers) + len(message.body),
            message.trace_headers, body, message.client_address, message.helo_name,
            message.auth_user, message.message_id_header, list(message.recipients),
            [recipient_next_hop(rcpt) for rcpt in message.recipients], encoding)
