"""Bodies at rest: stored as received, or compressed with zstd where that pays.

Compression is the node's, not PostgreSQL's (``messages.body`` has ``STORAGE EXTERNAL``:
no compression attempt there). It applies to bodies from ``database.compress_bodies_above``
up to ``STREAM_BODY_BYTES``: larger ones are streamed into the store by COPY a slice at a
time, and compressing one would need a second whole copy first (I4). A body that does not
shrink by at least an eighth (an attachment already compressed) is stored as received.
The column ``messages.body_encoding`` says which, so a body is never guessed from its
first bytes. Each zstd frame carries its content checksum: a body altered at rest is
refused (``CorruptBody``; delivery holds it), never sent altered.
"""

from __future__ import annotations

from typing import Literal

import zstandard

from mta.config.budget import STREAM_BODY_BYTES, compresses

BodyEncoding = Literal["identity", "zstd"]

#: zstd's fastest level: about 1.9 ms to compress and 1.6 ms to decompress a realistic
#: 1 MiB message on the benchmark VM, to 75% of its size (BENCHMARKS.md).
LEVEL = 1
#: A compressed body is kept only when it saves at least this share of the body.
MIN_SAVING = 1 / 8


class CorruptBody(ValueError):
    """A stored body that its encoding cannot decode."""


def encode(body: bytes | bytearray, compress_above: int) -> tuple[bytes | bytearray,
                                                                  BodyEncoding]:
    """The body as it is to be stored, and its encoding."""
    if not compresses(len(body), compress_above):
        return body, "identity"
    packed = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(body)
    if len(packed) > len(body) * (1 - MIN_SAVING):
        return body, "identity"
    return packed, "zstd"


def decode(stored: bytes, encoding: str) -> bytes:
    """The body as received, from its stored form; ``CorruptBody`` when it cannot be."""
    if encoding == "identity":
        return stored
    if encoding != "zstd":
        raise CorruptBody(f"unknown body encoding {encoding!r}")
    try:
        # The frame states its size; one that claims more than a compressed body can
        # have is refused before anything is allocated for it.
        size = zstandard.frame_content_size(stored)
        if not 0 <= size < STREAM_BODY_BYTES:
            raise CorruptBody(f"the stored zstd body states a size of {size}")
        return zstandard.ZstdDecompressor().decompress(stored)
    except zstandard.ZstdError as exc:
        raise CorruptBody(f"the stored zstd body does not decode: {exc}") from exc


def decode_head(stored: bytes, encoding: str, limit: int) -> bytes:
    """The first ``limit`` bytes of the body as received (a DSN's or a listing's headers);
    nothing when the stored body does not decode: a DSN then goes out without the
    original headers rather than not at all."""
    try:
        return decode(stored, encoding)[:limit]
    except CorruptBody:
        return b""
