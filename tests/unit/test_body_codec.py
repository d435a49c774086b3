"""The stored-body codec refuses what it cannot decode, without allocating for it."""

from __future__ import annotations

import struct

import pytest
import zstandard

from mta.config.budget import compresses
from mta.queue.body_codec import CorruptBody, decode, decode_head, encode
from mta.queue.message_copy import STREAM_BODY_BYTES

TEXT = b"Subject: x\r\n\r\n" + b"the same line again and again\r\n" * 4000


def test_a_body_round_trips_and_its_head_is_the_received_head() -> None:
    stored, encoding = encode(TEXT, 64 * 1024)
    assert encoding == "zstd" and len(stored) < len(TEXT) // 8
    assert decode(stored, encoding) == TEXT
    assert decode_head(stored, encoding, 14) == b"Subject: x\r\n\r\n"


def test_only_bodies_from_the_threshold_to_the_streaming_size_are_tried() -> None:
    assert not compresses(64 * 1024 - 1, 64 * 1024)
    assert compresses(64 * 1024, 64 * 1024)
    assert not compresses(STREAM_BODY_BYTES, 64 * 1024)
    assert not compresses(1024 * 1024, 0), "0 turns it off"


def test_garbage_an_unknown_encoding_and_a_false_size_are_refused() -> None:
    with pytest.raises(CorruptBody, match="does not decode"):
        decode(b"not a zstd frame at all", "zstd")
    with pytest.raises(CorruptBody, match="unknown body encoding"):
        decode(TEXT, "lz4")
    # A frame whose header claims 4 GiB: refused from the header, nothing allocated.
    huge = zstandard.ZstdCompressor(level=1).compress(b"x" * 100)
    params = zstandard.get_frame_parameters(huge)
    assert params.content_size == 100
    forged = _with_content_size(huge, 4 << 30)
    with pytest.raises(CorruptBody, match="states a size"):
        decode(forged, "zstd")


def test_a_flipped_byte_fails_the_checksum_and_a_head_of_garbage_is_empty() -> None:
    stored, encoding = encode(TEXT, 64 * 1024)
    altered = bytearray(stored)
    altered[len(altered) // 2] ^= 1
    with pytest.raises(CorruptBody, match="does not decode"):
        decode(bytes(altered), encoding)
    assert decode_head(b"not a zstd frame at all", "zstd", 100) == b"", \
        "a DSN goes out without the original headers rather than not at all"


def _with_content_size(frame: bytes, size: int) -> bytes:
    """The frame with its header rewritten to state ``size`` (an 8-byte size field)."""
    descriptor = frame[4]
    single_segment = bool(descriptor & 0x20)
    window = 0 if single_segment else 1
    header_rest = frame[5 + window:]
    fcs_flag = descriptor >> 6
    old_len = {0: 1 if single_segment else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
    new_descriptor = (descriptor & 0x3F) | 0xC0
    return (frame[:4] + bytes([new_descriptor]) + frame[5:5 + window]
            + struct.pack("<Q", size) + header_rest[old_len:])
