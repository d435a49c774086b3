"""The DATA reader checks and unstuffs each chunk as it arrives (issue 13, memory): for
any stream cut into any chunks it must give what reading the whole stream at once gives."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.intake import data_reader, replies
from mta.intake.data_reader import DataOutcome, has_long_line, read_data

END = b"\r\n.\r\n"


def reference(stream: bytes, *, max_size: int, max_line: int) -> tuple[bytes | None, str | None,
                                                                      bytes]:
    """The whole-stream reading: (body or None, refusal reason, what follows the dot)."""
    framed = b"\r\n" + stream
    end = framed.index(END)
    raw, leftover = framed[:end + 2], framed[end + len(END):]
    crlf = raw.count(b"\r\n")
    unstuffed = raw.replace(b"\r\n.", b"\r\n")
    if len(unstuffed) - 2 > max_size:
        return None, "too_big", leftover
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        return None, "bare_newline", leftover
    if has_long_line(bytearray(unstuffed), max_line):
        return None, "line_too_long", leftover
    return unstuffed[2:], None, leftover


async def read_in_chunks(stream: bytes, chunk: int, **limits: int) -> tuple[DataOutcome, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    original = data_reader.READ_CHUNK
    data_reader.READ_CHUNK = chunk
    try:
        outcome = await read_data(reader, on_chunk=lambda: None, **limits)  # type: ignore[arg-type]
    finally:
        data_reader.READ_CHUNK = original
    return outcome, await reader.read()


pieces = st.sampled_from([b"\r\n", b".", b"..", b"a", b"\r", b"\n", b"\r\n.", b"xyz"])


@settings(max_examples=1000, deadline=None)
@given(body=st.lists(pieces, max_size=40).map(b"".join),
       after=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n"]),
       chunk=st.integers(min_value=1, max_value=9),
       max_size=st.sampled_from([4, 30, 10_000]), max_line=st.sampled_from([3, 998]))
def test_chunked_reading_matches_reading_the_whole_stream(
    body: bytes, after: bytes, chunk: int, max_size: int, max_line: int
) -> None:
    stream = body + END + after
    want_body, want_reason, want_leftover = reference(stream, max_size=max_size,
                                                      max_line=max_line)
    outcome, leftover = asyncio.run(read_in_chunks(stream, chunk, max_size=max_size,
                                                   max_line=max_line))
    got = bytes(outcome.body) if outcome.body is not None else None
    assert (got, outcome.reason) == (want_body, want_reason)
    assert leftover == want_leftover


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 64])
def test_a_stuffed_dot_at_a_chunk_boundary_is_undone(chunk: int) -> None:
    stream = b"line one\r\n..hidden\r\n...two dots" + END
    outcome, _ = asyncio.run(read_in_chunks(stream, chunk, max_size=1000, max_line=998))
    assert outcome.body == bytearray(b"line one\r\n.hidden\r\n..two dots\r\n")


def test_a_dot_after_a_bare_lf_is_not_unstuffed() -> None:
    """Only a dot after CRLF is stuffing: after a bare LF (refused anyway) it counts, so
    the refusal is the one the whole stream gives (too big here)."""
    stream = b"\r\n\r\n\r\n\r\n..\r\n..\r\n..xyzxyzxyz\n..\r\n" + END
    outcome, _ = asyncio.run(read_in_chunks(stream, 1, max_size=30, max_line=3))
    assert outcome.reason == "too_big"


def test_an_oversized_body_is_not_kept_while_the_rest_is_read() -> None:
    stream = b"x" * 5000 + b"\r\n" + END
    reader_limit = 100
    outcome, _ = asyncio.run(read_in_chunks(stream, 256, max_size=reader_limit,
                                            max_line=10_000))
    assert outcome.body is None and outcome.refusal == replies.MESSAGE_TOO_BIG.format(
        limit=reader_limit)
