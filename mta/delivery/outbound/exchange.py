"""One mail transaction on an open session: [RSET,] MAIL, RCPT each, DATA, the content.

With PIPELINING (RFC 2920) the commands go out as one group and their replies are read
in order; without it each waits for its reply. A failure that ends the session is a
:class:`SessionFailure`: every recipient not yet answered gets it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from functools import partial

import aiosmtplib

from mta.config import DeliverySection
from mta.delivery.outbound.content import DotStuffer, chunks
from mta.delivery.outbound.transaction import Phase, RecipientResult, Transaction
from mta.delivery.outbound.wire import ClosedByPeer, Reply, Wire
from mta.faults import fault_point
from mta.mail.address import is_mailbox
from mta.mail.text import outside_text


class SessionFailure(Exception):
    """A session-wide failure: every recipient not yet answered gets it. ``stale``: a
    reused session found closed before this transaction got anywhere."""

    def __init__(self, code: int, text: str, phase: Phase, *, data_sent: bool = False,
                 stale: bool = False, broken: bool = False, local: bool = False) -> None:
        """``broken``: the session is out of step (mid-DATA) and must not be reused.
        ``local``: we refused before anything was sent (the server is not to blame)."""
        super().__init__(text)
        self.code, self.text, self.phase, self.data_sent = code, text, phase, data_sent
        self.stale, self.broken, self.local = stale, broken, local


def no_reply(exc: BaseException, waiting_for: str, timeout: float) -> tuple[int, str]:
    """Code and text for an exception met while ``waiting_for`` something; text that came
    from the server (aiosmtplib's replies) is made safe here."""
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code > 0:
        return exc.code, outside_text(exc.message)
    if isinstance(exc, ValueError):  # raised before anything was written
        return 0, f"refused locally: {outside_text(str(exc))}"
    if isinstance(exc, TimeoutError):
        return 0, f"timeout waiting for {waiting_for} after {timeout:g} s"
    detail = outside_text(str(exc) or type(exc).__name__)
    return 0, f"connection failed waiting for {waiting_for}: {detail}"


#: What a session step may raise; all of it becomes a result.
CLIENT_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError)


async def run_transaction(wire: Wire, transaction: Transaction,
                          before_data: Callable[[], Awaitable[None]],
                          before_dot: Callable[[list[str]], Awaitable[None]],
                          results: dict[str, RecipientResult], *, timeouts: DeliverySection,
                          pipelining: bool, reset: bool) -> None:
    """[RSET,] MAIL, RCPT each, DATA, the content, the dot: fills ``results``.

    With PIPELINING (RFC 2920) the commands go out as one group after ``before_data``
    and their replies are read in order; without it each waits for its reply, and
    ``before_data`` runs once a recipient is accepted. ``before_dot`` gets the accepted
    recipients once their content is written, right before the final dot. Every reply is
    read even after a refusal, so the session stays in step for the next transaction.
    """
    t = timeouts
    try:
        mail = _command("MAIL FROM:", transaction.mail_from)
    except ValueError as exc:
        raise SessionFailure(0, f"sender not sendable: {exc}", "mail", local=True) from exc
    rcpts: list[tuple[str, bytes]] = []
    for rcpt in transaction.recipients:
        try:
            rcpts.append((rcpt, _command("RCPT TO:", rcpt)))
        except ValueError as exc:
            results[rcpt] = RecipientResult(rcpt, 0, f"address not sendable: {exc}",
                                            "rcpt", False, "local")
    if not rcpts:
        return
    if pipelining:
        await _before(before_data)
        group = [b"RSET\r\n"] if reset else []
        group += [mail, *(command for _, command in rcpts), b"DATA\r\n"]
        _write(wire, b"".join(group), "mail", stale=reset)
    if reset:
        if not pipelining:
            _write(wire, b"RSET\r\n", "mail", stale=True)
        await _expect(wire, t.mail_timeout, "RSET", "mail", stale=True)
    if not pipelining:
        _write(wire, mail, "mail")
    mail_reply = await _read(wire, t.mail_timeout, "MAIL", "mail", stale=reset)
    mail_ok = 200 <= mail_reply.code < 300
    accepted: list[str] = []
    for rcpt, command in rcpts:
        if not pipelining:
            if not mail_ok:
                break
            _write(wire, command, "rcpt")
        reply = await _read(wire, t.rcpt_timeout, "RCPT", "rcpt")
        if 200 <= reply.code < 300:
            accepted.append(rcpt)
        elif mail_ok:
            results[rcpt] = RecipientResult(rcpt, reply.code, reply.text, "rcpt", False)
    if not pipelining and accepted:
        await _before(before_data)
        _write(wire, b"DATA\r\n", "data")
    data_reply = None
    if pipelining or accepted:
        data_reply = await _read(wire, t.data_init_timeout, "DATA", "data")
    if data_reply is not None and data_reply.code == 354 and not (mail_ok and accepted):
        # DATA accepted although MAIL or every RCPT was not (RFC 2920 3.1): closing
        # without the dot makes the server drop the transaction; a lone dot might
        # deliver an empty message.
        wire.close()
    if not mail_ok:
        raise SessionFailure(mail_reply.code, mail_reply.text, "mail")
    if not accepted:
        return
    assert data_reply is not None
    if data_reply.code != 354:
        raise SessionFailure(data_reply.code, data_reply.text, "data")
    code, text = await _data(wire, transaction.content, t, partial(before_dot, accepted))
    for rcpt in accepted:
        results[rcpt] = RecipientResult(rcpt, code, text, "data_end", True)


async def _data(wire: Wire, content: bytes | AsyncIterable[bytes], t: DeliverySection,
                before_dot: Callable[[], Awaitable[None]]) -> tuple[int, str]:
    """After the 354: the content in bounded chunks, ``before_dot``, the dot; the reply.

    Until the dot is written the server holds an unfinished transaction that it drops
    with the connection, so a failure there is certainly not a delivery (I3); from the
    dot on, every failure is ``data_sent``.
    """
    stuffer = DotStuffer()
    try:
        async for chunk in chunks(content):
            wire_bytes = stuffer.feed(chunk)
            if wire_bytes:
                wire.write(wire_bytes)
                await wire.drain(t.data_block_timeout)
                fault_point("delivery.during_data")
    except CLIENT_ERRORS as exc:
        raise SessionFailure(*no_reply(exc, "the server to take a data block",
                                       t.data_block_timeout), "data", broken=True) from exc
    except Exception as exc:  # the content source failed
        raise SessionFailure(0, f"not sent: the content source failed mid-data: {exc!r}",
                             "data", broken=True, local=True) from exc
    try:
        await before_dot()
    except Exception as exc:
        raise SessionFailure(0, f"not sent: the dot-pending record failed: {exc!r}", "data",
                             broken=True, local=True) from exc
    try:
        wire.write(stuffer.end())
        await wire.drain(t.data_block_timeout)
        fault_point("delivery.after_dot")
        final = await wire.reply(t.data_end_timeout)
    except CLIENT_ERRORS as exc:
        raise SessionFailure(*no_reply(exc, "reply to end of data", t.data_end_timeout),
                             "data_end", data_sent=True) from exc
    if final.code == 421:
        wire.close()
    return final.code, final.text


def _command(verb: str, address: str) -> bytes:
    """``MAIL FROM:<a>`` or ``RCPT TO:<a>`` as wire bytes; ValueError when the address is
    not a mailbox as intake accepts one (or the null path): nothing else, no control
    character and no non-ASCII, reaches a command line."""
    if address and not is_mailbox(address):
        raise ValueError(f"{address!r} is not a mailbox")
    return f"{verb}<{address}>\r\n".encode("ascii")


async def _before(before_data: Callable[[], Awaitable[None]]) -> None:
    try:
        await before_data()
    except Exception as exc:
        raise SessionFailure(0, f"not sent: before_data failed: {exc!r}", "data",
                             local=True) from exc


def _write(wire: Wire, data: bytes, phase: Phase, *, stale: bool = False) -> None:
    try:
        wire.write(data)
    except OSError as exc:
        raise SessionFailure(0, f"connection failed before {phase.upper()}: {exc}", phase,
                       stale=stale) from exc


async def _read(wire: Wire, timeout: float, command: str, phase: Phase, *,
                stale: bool = False) -> Reply:
    """The next reply; a closed connection before it is ``stale`` when asked (a reused
    session the server timed out while idle), a timeout never is."""
    try:
        return await wire.reply(timeout)
    except ClosedByPeer as exc:
        raise SessionFailure(*no_reply(exc, f"the reply to {command}", timeout), phase,
                       stale=stale) from exc
    except CLIENT_ERRORS as exc:
        raise SessionFailure(*no_reply(exc, f"the reply to {command}", timeout), phase) from exc


async def _expect(wire: Wire, timeout: float, command: str, phase: Phase, *,
                  stale: bool = False) -> None:
    """A 2xx reply to ``command``, or a failure that retires the session."""
    reply = await _read(wire, timeout, command, phase, stale=stale)
    if not 200 <= reply.code < 300:
        raise SessionFailure(reply.code, reply.text, phase, stale=stale)
