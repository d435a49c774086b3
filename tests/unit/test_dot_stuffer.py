"""The outbound DATA encoder: CRLF line endings and dot-stuffing, however content is cut."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from mta.delivery.outbound.content import DotStuffer


def reference(content: bytes) -> bytes:
    """RFC 5321 4.5.2 on the whole content at once: CRLF lines, a dot doubled at a line
    start, a final CRLF, then the terminating dot."""
    lines = re.split(rb"\r\n|\n|\r", content)
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


def encode(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(chunk) for chunk in chunks) + stuffer.end()


@given(st.lists(st.binary(max_size=40).map(
    lambda raw: bytes(b"\r\n.ab"[byte % 5] for byte in raw)), max_size=12))
def test_any_cut_of_any_content_encodes_as_the_whole_would(chunks: list[bytes]) -> None:
    assert encode(chunks) == reference(b"".join(chunks))


def test_clean_crlf_content_is_only_dot_stuffed() -> None:
    assert encode([b".a\r\nb\r\n..c\r\n"]) == b"..a\r\nb\r\n...c\r\n.\r\n"
