"""Clients that submit in loops and keep a ledger of what the server answered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from tests.support.smtp import RawSMTP, dot_stuff, queue_id_of

#: Seconds a test client waits for any one reply.
REPLY_TIMEOUT_S = 20.0


def make_body(message_id: str, size: int = 512) -> bytes:
    """A CRLF message with ``message_id`` in its header and about ``size`` bytes of text."""
    line = b"The quick brown fox jumps over the lazy dog. 0123456789\r\n"
    text = line * max(1, size // len(line))
    return f"Message-ID: {message_id}\r\nSubject: test\r\n\r\n".encode() + text


@dataclass
class Ledger:
    """What clients saw: 250s by Message-ID, other replies, and DATA phases they ended."""

    accepted: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    dots_sent: int = 0
    in_flight: set[int] = field(default_factory=set)
    on_accept: Callable[[], None] | None = None


async def submit_loop(port: int, client: int, ledger: Ledger, count: int,
                      stop: asyncio.Event | None = None, *, tag: str = "m",
                      size: int = 512) -> None:
    """Submit up to ``count`` messages on one session, until ``stop`` or a dropped connection.

    Message-IDs are ``<{tag}-{client}-{n}@test.invalid>``. A dropped connection ends the
    loop quietly: the ledger says what was answered before it.
    """
    try:
        smtp = await RawSMTP.connect(port)
    except (ConnectionError, TimeoutError):
        return
    try:
        await smtp.cmd("EHLO client.test")
        for n in range(count):
            if stop is not None and stop.is_set():
                return
            message_id = f"<{tag}-{client}-{n}@test.invalid>"
            ledger.in_flight.add(client)
            reply = await _transaction(smtp, message_id, size, ledger)
            ledger.in_flight.discard(client)
            if reply.startswith("250"):
                ledger.accepted[message_id] = queue_id_of(reply)
                if ledger.on_accept is not None:
                    ledger.on_accept()
            else:
                ledger.refused[message_id] = reply
    except (ConnectionError, TimeoutError):
        return
    finally:
        await smtp.close()


async def _transaction(smtp: RawSMTP, message_id: str, size: int, ledger: Ledger) -> str:
    """One MAIL/RCPT/DATA transaction; the first reply that is not positive ends it."""
    await smtp.send(b"MAIL FROM:<sender@example.org>\r\n")
    reply = await smtp.reply(REPLY_TIMEOUT_S)
    if not reply.startswith("250"):
        return reply
    await smtp.send(b"RCPT TO:<rcpt@example.com>\r\n")
    reply = await smtp.reply(REPLY_TIMEOUT_S)
    if not reply.startswith("250"):
        await smtp.cmd("RSET")
        return reply
    await smtp.send(b"DATA\r\n")
    reply = await smtp.reply(REPLY_TIMEOUT_S)
    if not reply.startswith("354"):
        return reply
    ledger.dots_sent += 1  # counted before the write: an upper bound on what may be stored
    await smtp.send(dot_stuff(make_body(message_id, size)) + b".\r\n")
    return await smtp.reply(REPLY_TIMEOUT_S)


async def park_in_data(port: int, message_id: str) -> RawSMTP:
    """A session that has sent DATA and half a body, and stops there."""
    smtp = await RawSMTP.connect(port)
    assert (await smtp.cmd("EHLO parked.test")).startswith("250")
    assert (await smtp.cmd("MAIL FROM:<parked@example.org>")).startswith("250")
    assert (await smtp.cmd("RCPT TO:<rcpt@example.com>")).startswith("250")
    assert (await smtp.cmd("DATA")).startswith("354")
    body = dot_stuff(make_body(message_id))
    await smtp.send(body[: len(body) // 2])
    return smtp


def finish_parked(message_id: str) -> bytes:
    """The second half of what :func:`park_in_data` began, with the final dot."""
    body = dot_stuff(make_body(message_id))
    return body[len(body) // 2:] + b".\r\n"


async def stored_message_ids(dsn: str) -> list[tuple[uuid.UUID, str | None]]:
    """Every stored message's id and Message-ID header, read over a connection of our own."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT id, message_id_header FROM messages")
    finally:
        await conn.close()
    return [(row["id"], row["message_id_header"]) for row in rows]
