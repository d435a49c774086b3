"""The outbound SMTP client: one session per connection, reused per next hop.

``OutboundConnection.send(transaction, before_data=...)`` runs one transaction (MAIL,
RCPT per recipient, DATA) and answers one ``RecipientResult`` per recipient. It
connects on first use (TCP to the hop's addresses in MX order, greeting, EHLO, STARTTLS
per the hop's policy, AUTH when the hop has credentials, all through aiosmtplib), moving
on to the next address when a connection or a session before MAIL fails. No aiosmtplib,
ssl or socket exception escapes ``send()``: each becomes a result.

Transactions then run on a ``Wire`` (``mta.delivery.outbound.wire``). When the server offers
PIPELINING (RFC 2920), MAIL, every RCPT and DATA go out as one group and their replies
are read in order: two round trips per message, the group and the content. A reused
session starts each transaction with RSET (at the head of the group when pipelining),
which also proves the session alive; one found closed before any reply of the
transaction is replaced by a fresh session, once, instead of deferring the mail.

Codes: a recorded reply keeps its code and text (evidence, DESIGN.md I2). Code 0 means
no usable reply: a network error, a timeout, or a local refusal (TLS policy, AUTH
without TLS, an address that cannot be sent); the text says which.

``data_sent`` (DESIGN.md I3) is True exactly when the client started writing the final
dot: from then on the server may have accepted the message. So a break or timeout while
writing the dot or waiting for the reply to it gives ``code=0, data_sent=True``: the
``uncertain`` case (``result.uncertain``). A recorded reply at the end of data also has
``data_sent=True`` with its code (a ``451`` there is a plain deferral). Everything before
the dot, including a break while the content is written (the server drops an unfinished
transaction with the connection), a failing ``before_data`` or ``before_dot`` and no
reply to DATA itself, has ``data_sent=False``: the message was certainly not accepted.
``before_data`` (the body is read) runs before the pipelined group is written, or once a
recipient is accepted without pipelining; ``before_dot`` (the journal's "dot pending")
runs once the content is written, right before the dot; neither runs twice.

TLS policies: ``none`` never starts TLS; ``opportunistic`` starts it when offered,
without verifying the certificate (RFC 7435); ``required`` fails (code 0, phase
``starttls``) when it is not offered; ``verify`` is ``required`` with the certificate
verified against the injected context or the CA bundle. A failed handshake drops the
session and defers (phase ``starttls``): no plaintext retry, even when opportunistic.
AUTH only runs over TLS, unless the hop's policy is ``none``.

Timeouts (RFC 5321 4.5.3.2), the ``delivery.*_timeout`` settings: ``greeting`` for the
220, ``mail`` for MAIL and also for EHLO, STARTTLS, AUTH and RSET, ``rcpt`` per RCPT,
``data_init`` for the 354, ``data_block`` per written chunk, ``data_end`` for the reply to
the dot; ``connect`` is the TCP connect.

One connection serves one ``send()`` at a time; ``ConnectionCache`` (``cache.py``) hands
each out to one user and keeps idle ones per ``NextHop.key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import cast

import aiosmtplib

from mta.config import DeliverySection
from mta.delivery.outbound.exchange import (
    CLIENT_ERRORS,
    SessionFailure,
    no_reply,
    run_transaction,
)
from mta.delivery.outbound.transaction import SETUP_PHASES, RecipientResult, Transaction
from mta.delivery.outbound.wire import Wire
from mta.delivery.routing import NextHop, addresses_to_try, open_socket

__all__ = ["OutboundConnection"]

#: Seconds a polite QUIT may take when an idle connection is closed.
QUIT_TIMEOUT = 5.0
#: Sessions per delivery attempt that may fail before MAIL before the attempt gives up
#: (Postfix's ``smtp_mx_session_limit``); refused connections do not count.
MAX_SESSIONS_PER_ATTEMPT = 2


#: Phases before MAIL: a failure there leaves no usable session.
_SESSION_PHASES = SETUP_PHASES | {"connect"}

class OutboundConnection:
    """One SMTP session to the first host of ``next_hop`` that accepts a connection."""

    def __init__(self, next_hop: NextHop, *, ehlo_name: str,
                 timeouts: DeliverySection | None = None,
                 tls_context: ssl.SSLContext | None = None, ca_bundle: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``tls_context`` verifies for ``verify`` (default: ``ca_bundle`` or the system CAs)."""
        self.next_hop = next_hop
        self.ehlo_name = ehlo_name
        self.timeouts = timeouts or DeliverySection()
        self._verify_context = tls_context
        self._ca_bundle = ca_bundle
        self._clock = clock
        self._setup: aiosmtplib.SMTP | None = None
        self._wire: Wire | None = None
        self._broken = False
        self.messages_sent = 0
        self.idle_since = clock()
        self.tls = False
        self.pipelining = False
        self.peer = ""

    @property
    def reusable(self) -> bool:
        """Connected, and nothing went wrong that could leave the session out of step."""
        return not self._broken and self._wire is not None and self._wire.is_open

    async def send(self, transaction: Transaction, *,
                   before_data: Callable[[], Awaitable[None]],
                   before_dot: Callable[[list[str]], Awaitable[None]] | None = None,
                   ) -> list[RecipientResult]:
        """Run one transaction; ``before_data`` is awaited before the content can be sent,
        ``before_dot`` (with the accepted recipients) right before the final dot.

        A reused session that turns out closed before anything of this transaction was
        answered (the server timed it out while idle) is replaced by a fresh one, once.
        """
        dot = before_dot or _nothing_to_record
        results: dict[str, RecipientResult] = {}
        prepared = False

        async def prepare_once() -> None:  # a retry on a fresh session does not redo it
            nonlocal prepared
            if not prepared:
                await before_data()
                prepared = True

        try:
            if self._broken:
                raise SessionFailure(0, "connection already failed", "connect")
            try:
                await self._attempt(transaction, prepare_once, dot, results)
            except SessionFailure as failure:
                if not failure.stale:
                    raise
                self.abort()
                self._wire, self._broken, self.tls, self.messages_sent = None, False, False, 0
                results.clear()
                await self._attempt(transaction, prepare_once, dot, results)
        except SessionFailure as failure:
            if (failure.phase in _SESSION_PHASES or failure.data_sent or failure.stale
                    or failure.broken):
                self.abort()
            for rcpt in transaction.recipients:
                results.setdefault(rcpt, RecipientResult(
                    rcpt, failure.code, failure.text, failure.phase, failure.data_sent,
                    "local" if failure.local else "smtp"))
        except BaseException:  # cancelled mid-session: the session is out of step
            self.abort()
            raise
        finally:
            self.idle_since = self._clock()
        return [results[rcpt] for rcpt in transaction.recipients]

    async def _attempt(self, transaction: Transaction,
                       before_data: Callable[[], Awaitable[None]],
                       before_dot: Callable[[list[str]], Awaitable[None]],
                       results: dict[str, RecipientResult]) -> None:
        reused = self._wire is not None
        wire = self._wire if self._wire is not None else await self._open()
        self.messages_sent += 1
        await run_transaction(wire, transaction, before_data, before_dot, results,
                              timeouts=self.timeouts, pipelining=self.pipelining, reset=reused)

    async def close(self) -> None:
        """QUIT politely when the session is healthy, then close the socket."""
        if self.reusable and self._wire is not None:
            with contextlib.suppress(*CLIENT_ERRORS):
                self._wire.write(b"QUIT\r\n")
                await self._wire.reply(min(QUIT_TIMEOUT, self.timeouts.mail_timeout))
        self.abort()

    def abort(self) -> None:
        """Close at once, without QUIT; the connection is never used again."""
        self._broken = True
        if self._wire is not None:
            self._wire.close()
        if self._setup is not None:
            self._setup.close()
            self._setup = None

    async def _open(self) -> Wire:
        """A ready session with the first host address that gives one, in MX order.

        A refused connection, or a session that fails before MAIL (a 4xx or 5xx or no
        greeting, EHLO refused, a failed TLS handshake or policy, AUTH refused), moves on
        to the next address, as Postfix does; at most ``MAX_SESSIONS_PER_ATTEMPT`` of
        them get as far as a greeting.
        """
        hop, t = self.next_hop, self.timeouts
        failures: list[str] = []
        last: SessionFailure | None = None
        sessions = 0
        for host, address in addresses_to_try(hop.hosts):
            peer = f"{host.name}[{address}]:{hop.port}"
            try:
                sock = await open_socket(address, hop.port, timeout=t.connect_timeout)
            except (OSError, TimeoutError) as exc:
                last = SessionFailure(0, f"{peer}: {str(exc) or type(exc).__name__}", "connect")
                failures.append(last.text)
                continue
            self.peer, sessions = peer, sessions + 1
            try:
                return await self._handshake(host.name, sock)
            except SessionFailure as failure:
                self.abort()
                self._broken, self.tls = False, False
                last = failure
                failures.append(f"{peer}: {failure.code} {failure.text}" if failure.code
                                else f"{peer}: {failure.text}")
                if sessions >= MAX_SESSIONS_PER_ATTEMPT:
                    break
        if last is None:
            raise SessionFailure(0, "no address to connect to", "connect")
        if sessions == 0:
            raise SessionFailure(0, "no host accepted a connection: " + "; ".join(failures),
                           "connect")
        text = last.text if len(failures) == 1 else "; ".join(failures)
        raise SessionFailure(last.code, text, last.phase)

    async def _handshake(self, host_name: str, sock: socket.socket) -> Wire:
        """Greeting, EHLO, STARTTLS and AUTH as the hop says, on a connected socket; then
        the connection's transport passes to a ``Wire`` for the transactions."""
        hop, t = self.next_hop, self.timeouts
        smtp = aiosmtplib.SMTP(sock=sock, hostname=host_name, local_hostname=self.ehlo_name,
                               timeout=t.greeting_timeout, start_tls=False)
        self._setup = smtp
        try:
            await smtp.connect()
        except CLIENT_ERRORS as exc:
            sock.close()
            raise SessionFailure(*no_reply(exc, f"the greeting of {self.peer}", t.greeting_timeout),
                           "greeting") from exc
        await self._ehlo(smtp)
        if hop.tls != "none" and (smtp.supports_extension("starttls")
                                  or hop.tls in ("required", "verify")):
            await self._starttls(smtp)
        if hop.username is not None and hop.password is not None:
            if not self.tls and hop.tls != "none":
                raise SessionFailure(0, f"AUTH refused locally: no TLS with {self.peer}", "auth",
                                     local=True)
            try:
                await smtp.login(hop.username, hop.password, timeout=t.mail_timeout)
            except CLIENT_ERRORS as exc:
                raise SessionFailure(*no_reply(exc, "the reply to AUTH", t.mail_timeout),
                               "auth") from exc
        transport = smtp.transport
        if transport is None or transport.is_closing():
            raise SessionFailure(0, f"connection to {self.peer} closed after the setup", "ehlo")
        self.pipelining = smtp.supports_extension("pipelining")
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._wire = Wire.take_over(cast(asyncio.Transport, transport))
        self._setup = None
        return self._wire

    async def _ehlo(self, smtp: aiosmtplib.SMTP) -> None:
        """EHLO, or HELO when the server refuses EHLO."""
        t = self.timeouts.mail_timeout
        try:
            try:
                await smtp.ehlo(timeout=t)
            except aiosmtplib.SMTPHeloError:
                await smtp.helo(timeout=t)
        except CLIENT_ERRORS as exc:
            raise SessionFailure(*no_reply(exc, "the reply to EHLO", t), "ehlo") from exc

    async def _starttls(self, smtp: aiosmtplib.SMTP) -> None:
        """STARTTLS per the hop's policy, then EHLO again (RFC 3207)."""
        policy, t = self.next_hop.tls, self.timeouts.mail_timeout
        if not smtp.supports_extension("starttls"):
            raise SessionFailure(0, f"TLS {policy} but {self.peer} does not offer STARTTLS",
                           "starttls")
        try:
            await smtp.starttls(tls_context=self._tls_context(), timeout=t)
        except CLIENT_ERRORS as exc:
            raise SessionFailure(*no_reply(exc, "the TLS handshake", t), "starttls") from exc
        self.tls = True
        await self._ehlo(smtp)

    def _tls_context(self) -> ssl.SSLContext:
        """A verifying context for ``verify``; an encrypting-only one otherwise."""
        if self.next_hop.tls == "verify":
            if self._verify_context is not None:
                return self._verify_context
            return ssl.create_default_context(cafile=self._ca_bundle)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA loading: verifies nothing
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context


async def _nothing_to_record(accepted: list[str]) -> None:
    """The ``before_dot`` of a caller that keeps no journal."""
