"""Text from outside made safe where it enters (DESIGN.md I3b).

Remote replies, DNS answers and client input may hold anything: bytes that are not
UTF-8, NUL (which PostgreSQL text cannot hold), other control characters, megabytes.
:func:`outside_text` turns such input into text that every log line, store row, journal
record and DSN can carry. Printable characters, tabs and the line breaks between the
lines of a reply stay; every other control character, and every byte that is not UTF-8,
becomes a visible escape (``\\x00``, ``\\r``, ``\\xe9``); the result is capped in length,
with a marker that says how much was cut. The same input always gives the same text.
"""

from __future__ import annotations

import re

#: Characters of outside text kept at most (a reply's lines together, escapes included).
MAX_OUTSIDE_TEXT = 2000

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code == 0x0D:
        return "\\r"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def outside_text(raw: bytes | str, *, limit: int = MAX_OUTSIDE_TEXT) -> str:
    """``raw`` as safe text: escapes for control characters and for bytes that are not
    UTF-8, at most ``limit`` characters before a marker that says what was cut."""
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    text = _UNSAFE.sub(_escape, text)
    if len(text) > limit:
        text = f"{text[:limit]}… [{len(text) - limit} more characters cut]"
    return text
