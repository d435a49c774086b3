"""Header work at intake: loop detection, and the trace headers we add."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from mta.mail.headers import header_block
from mta.mail.text import outside_text

#: The longest Message-ID kept (a header line's limit, RFC 5322 2.1.1).
MAX_MESSAGE_ID = 998

_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True)
class HeaderFacts:
    """What intake needs to know about a message's header block."""

    received_count: int
    message_id: str | None


def inspect_headers(body: bytes | bytearray) -> HeaderFacts:
    """Count ``Received:`` headers and read ``Message-ID:``."""
    block = header_block(body)
    found = _MESSAGE_ID.search(block)
    message_id = None
    if found:
        text = found[1].decode("ascii", "replace").replace("\r\n", "")
        # NUL dropped, as before; any other control character escaped, the length capped.
        text = text.replace("\0", "").strip()
        message_id = outside_text(text, limit=MAX_MESSAGE_ID) or None
    return HeaderFacts(len(_RECEIVED.findall(block)), message_id)


@dataclass(frozen=True)
class TraceContext:
    """Who sent a message to us, and how."""

    helo: str
    client_ip: str
    hostname: str
    tls: bool
    authenticated: bool
    queue_id: str
    recipients: tuple[str, ...]


def received_header(ctx: TraceContext, now: datetime | None = None) -> str:
    """A RFC 5321 ``Received:`` line with the RFC 3848 protocol keyword."""
    protocol = "ESMTP" + ("S" if ctx.tls else "") + ("A" if ctx.authenticated else "")
    stamp = format_datetime(now or datetime.now(UTC))
    helo = printable(ctx.helo)
    for_clause = f"\r\n\tfor <{ctx.recipients[0]}>" if len(ctx.recipients) == 1 else ""
    return (
        f"Received: from {helo} ([{ctx.client_ip}])\r\n"
        f"\tby {ctx.hostname} (mta-fleet) with {protocol} id {ctx.queue_id}"
        f"{for_clause}; {stamp}\r\n"
    )


def message_id_header(queue_id: str, hostname: str) -> tuple[str, str]:
    """A ``Message-ID:`` header for a message that has none, and the id itself."""
    value = f"<{queue_id}@{hostname}>"
    return f"Message-ID: {value}\r\n", value


def printable(text: str) -> str:
    """``text`` with every character outside visible ASCII as ``?``, at most 255 long."""
    cleaned = "".join(char if 0x21 <= ord(char) < 0x7F else "?" for char in text)
    return cleaned[:255] or "unknown"
