"""An SMTP sink on loopback for delivery tests: records every transaction, injects faults.

The sink is an aiosmtpd server created on the test's own running loop, on 127.0.0.1 and
an OS-picked port. Each transaction that reaches the final dot is recorded (envelope,
raw bytes, Message-ID, monotonic time, the reply sent), so a test can count deliveries
per (Message-ID, recipient) and find duplicates and losses.

The sink offers PIPELINING (RFC 2920) unless made with ``pipelining=False``; with
``record_reads=True`` it keeps the start of every chunk it reads, so a test can see which
commands arrived together.

Faults (``Faults``, replaceable at any time through ``sink.faults``):

- ``reject``: a reply (e.g. ``550 5.1.1 no such user``) to RCPT for given recipients;
- ``max_recipients``: ``452 4.5.3`` to every RCPT past that many in one transaction;
- ``hang``: never reply to the final dot, until ``release()`` (or ``hang_limit``);
- ``greet=False``: accept TCP but never send a greeting (a hung destination);
- ``data_reply``: the reply to every final dot instead of ``250`` (e.g. a ``554``);
- three exclusive fractions of the transactions that reach DATA: drop the connection
  mid-DATA after ``drop_after_bytes`` bytes (nothing recorded), drop it after the final
  dot without a reply (recorded, ``dropped_after_dot=True``), or reply ``tempfail_reply``
  (``421`` also closes the connection). One number per transaction, drawn from
  ``random.Random(seed)`` when the server sends ``354``, picks the fault: below
  ``drop_mid_data`` → mid-DATA drop, then ``drop_after_dot``, then ``tempfail``.

A delivery counts as received when its data reached the sink and the client was not
told to retry: replied ``2xx``, dropped after the dot, or hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from email import policy
from email.parser import BytesHeaderParser
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

ACCEPTED = "250 2.0.0 Ok: received"
#: How much of each chunk read from a client ``record_reads`` keeps.
READ_RECORD_BYTES = 512
HANG_TIMEOUT = "421 4.4.2 Sink hang limit reached, closing connection"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"


@dataclass(frozen=True)
class Faults:
    """What the sink does wrong; replace the whole value to change it during a test."""

    tempfail: float = 0.0
    tempfail_reply: str = "451 4.3.0 Sink: try again later"
    drop_mid_data: float = 0.0
    drop_after_bytes: int = 64
    drop_after_dot: float = 0.0
    reject: Mapping[str, str] = field(default_factory=dict)
    hang: bool = False
    greet: bool = True
    #: The reply to every final dot instead of ``250`` (a ``5xx`` rejects the content).
    data_reply: str | None = None
    #: Recipients one transaction takes; RCPTs past it get ``TOO_MANY_RECIPIENTS``.
    max_recipients: int | None = None

    def __post_init__(self) -> None:
        fractions = (self.tempfail, self.drop_mid_data, self.drop_after_dot)
        if any(not 0.0 <= f <= 1.0 for f in fractions) or sum(fractions) > 1.0:
            raise ValueError(f"fractions must be in [0, 1] and sum to at most 1: {fractions}")
        if not self.tempfail_reply.startswith("4"):
            raise ValueError(f"tempfail_reply must be a 4xx reply: {self.tempfail_reply!r}")
        if any(reply[:1] not in ("4", "5") for reply in self.reject.values()):
            raise ValueError("reject replies must be 4xx or 5xx")
        if self.drop_after_bytes < 1:
            raise ValueError("drop_after_bytes must be positive")
        if self.data_reply is not None and self.data_reply[:1] not in ("2", "4", "5"):
            raise ValueError(f"data_reply must be 2xx, 4xx or 5xx: {self.data_reply!r}")


@dataclass
class Transaction:
    """One transaction whose final dot reached the sink."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str | None
    received_at: float
    tls: bool
    auth_user: str | None
    reply: str | None = None
    dropped_after_dot: bool = False
    hung: bool = False

    @property
    def received(self) -> bool:
        """The data arrived and the client was not told to retry or give up."""
        return self.reply is None or self.reply.startswith("2")


def normalize_id(message_id: str) -> str:
    """A Message-ID without surrounding whitespace and angle brackets."""
    return message_id.strip().strip("<>")


def _abort(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection at once, without flushing or replying (uvloop's transports are
    not ``asyncio.Transport`` subclasses, so this asks for the method)."""
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with the hooks the sink's byte-level faults need."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(_Handler(sink), **kwargs)
        self.sink = sink
        self.fault: str | None = None
        self._drop_budget: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sink._transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._transports.discard(self.transport)
        self.sink._transports.discard(self._original_transport)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        """Send a reply; pick this transaction's fault at ``354``, close after ``421``."""
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        if self.transport is None or self.transport.is_closing():
            return  # aborted by a fault: nobody is listening for the reply
        if text.startswith("354"):
            self.fault = self.sink._draw_fault()
            if self.fault == "drop_mid_data":
                self._drop_budget = self.sink.faults.drop_after_bytes
        await super().push(status)
        if text.startswith("421") and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Feed the reader, unless a mid-DATA drop is due: then abort without feeding."""
        if self.sink.reads is not None:
            self.sink.reads.append(data[:READ_RECORD_BYTES])
        if self._drop_budget is not None:
            self._drop_budget -= len(data)
            if self._drop_budget <= 0:
                self._drop_budget = None
                _abort(self.transport)
                return
        super().data_received(data)


class _Silent(asyncio.Protocol):
    """Accepts the connection and never says a word (a hung destination)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.sink._transports.add(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._transports.discard(self.transport)


class _Handler:
    """aiosmtpd hooks: RCPT rejections, and recording plus faults at the final dot."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: _SinkSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not self.sink.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(self, server: _SinkSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        rejected = {rcpt.lower(): reply for rcpt, reply in self.sink.faults.reject.items()}
        reply = rejected.get(address.lower())
        if reply is not None:
            return reply
        limit = self.sink.faults.max_recipients
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: _SinkSMTP, session: Session,
                          envelope: Envelope) -> str:
        sink, fault = self.sink, server.fault
        server.fault = None
        server._drop_budget = None
        data = bytes(envelope.original_content or b"")
        header = BytesHeaderParser(policy=policy.compat32).parsebytes(data).get("Message-ID")
        auth = session.auth_data
        record = Transaction(
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos), data=data,
            message_id=normalize_id(str(header)) if header is not None else None,
            received_at=time.monotonic(), tls=session.ssl is not None,
            auth_user=auth.login.decode() if isinstance(auth, LoginPassword) else None)
        if fault == "drop_after_dot":
            record.dropped_after_dot = True
            await sink._record(record)
            _abort(server.transport)
            return ACCEPTED  # written to an aborted transport: the client never sees it
        if fault == "tempfail":
            record.reply = sink.faults.tempfail_reply
        elif sink.faults.hang:
            record.hung = True
            await sink._record(record)
            try:
                await asyncio.wait_for(sink._released.wait(), sink.hang_limit)
            except TimeoutError:
                record.reply = HANG_TIMEOUT
                await sink._changed()
                return HANG_TIMEOUT
            record.reply = ACCEPTED
            await sink._changed()
            return ACCEPTED
        else:
            record.reply = sink.faults.data_reply or ACCEPTED
        await sink._record(record)
        return record.reply


class Sink:
    """The recording SMTP server; start it with ``running_sink()`` or ``start()``/``stop()``."""

    #: The SMTP session class (a subclass may read DATA differently).
    protocol_class: type[_SinkSMTP] = _SinkSMTP

    def __init__(self, *, seed: int = 0, faults: Faults | None = None,
                 tls_context: ssl.SSLContext | None = None,
                 credentials: Mapping[str, str] | None = None, hostname: str = "sink.test",
                 idle_timeout: float = 30.0, hang_limit: float = 30.0,
                 pipelining: bool = True, record_reads: bool = False) -> None:
        self.faults = faults or Faults()
        self.pipelining = pipelining
        #: The start of every chunk read from every client, in order (``record_reads``).
        self.reads: list[bytes] | None = [] if record_reads else None
        self.rng = random.Random(seed)
        self.tls_context = tls_context
        self.credentials = dict(credentials) if credentials is not None else None
        self.hostname = hostname
        self.idle_timeout = idle_timeout
        self.hang_limit = hang_limit
        self.transactions: list[Transaction] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._released = asyncio.Event()
        self._condition = asyncio.Condition()

    async def start(self) -> None:
        """Listen on 127.0.0.1 on an OS-picked port (``self.port``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Release hung replies, abort every connection and stop listening."""
        self._released.set()
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            _abort(transport)
        self._transports.clear()
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def drop_connections(self) -> None:
        """Abort every open client connection and keep listening (a server that drops
        idle sessions, or restarted)."""
        for transport in list(self._transports):
            _abort(transport)

    def release(self) -> None:
        """End the hang: hung transactions get ``250`` now, later ones are not hung."""
        self.faults = replace(self.faults, hang=False)
        self._released.set()
        self._released = asyncio.Event()

    def reseed(self, seed: int) -> None:
        """Restart the fault draws from ``seed``."""
        self.rng = random.Random(seed)

    def count(self, message_id: str, rcpt: str) -> int:
        """How many times the sink received ``message_id`` for ``rcpt``."""
        return self._tally()[(normalize_id(message_id), rcpt.lower())]

    def duplicates(self) -> dict[tuple[str, str], int]:
        """Every (Message-ID, recipient) received more than once, with its count."""
        return {key: n for key, n in self._tally().items() if n > 1}

    def missing(self, expected: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The expected (Message-ID, recipient) pairs never received: the losses."""
        tally = self._tally()
        return {pair for pair in expected
                if tally[(normalize_id(pair[0]), pair[1].lower())] == 0}

    def received_ids(self) -> set[str]:
        """The Message-IDs (without angle brackets) received at least once."""
        return {t.message_id for t in self.transactions if t.received and t.message_id}

    def deliveries(self) -> int:
        """How many (transaction, recipient) deliveries were received."""
        return sum(len(t.recipients) for t in self.transactions if t.received)

    async def wait_for_count(self, n: int, timeout: float) -> None:
        """Wait until at least ``n`` deliveries were received; TimeoutError after ``timeout``."""
        await self.wait_until(lambda sink: sink.deliveries() >= n, timeout)

    async def wait_until(self, predicate: Callable[[Sink], bool], timeout: float) -> None:
        """Wait until ``predicate(self)`` holds, re-checked on every recorded change."""
        async with self._condition:
            try:
                await asyncio.wait_for(self._condition.wait_for(lambda: predicate(self)),
                                       timeout)
            except TimeoutError:
                raise TimeoutError(f"sink condition not met within {timeout}s: "
                                   f"{len(self.transactions)} transactions") from None

    def _tally(self) -> Counter[tuple[str, str]]:
        return Counter((t.message_id or "", rcpt.lower())
                       for t in self.transactions if t.received for rcpt in t.recipients)

    def _draw_fault(self) -> str | None:
        """The fault for one transaction entering DATA (one draw per transaction)."""
        draw, faults = self.rng.random(), self.faults
        for name, share in (("drop_mid_data", faults.drop_mid_data),
                            ("drop_after_dot", faults.drop_after_dot),
                            ("tempfail", faults.tempfail)):
            if draw < share:
                return name
            draw -= share
        return None

    def _protocol(self) -> asyncio.BaseProtocol:
        self.connections += 1
        if not self.faults.greet:
            return _Silent(self)
        auth = self.credentials is not None
        return self.protocol_class(
            self, hostname=self.hostname, tls_context=self.tls_context,
            timeout=self.idle_timeout, auth_required=auth,
            auth_require_tls=self.tls_context is not None,
            authenticator=self._authenticate if auth else None,
            loop=asyncio.get_running_loop())

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        if self.credentials is None or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        return AuthResult(success=self.credentials.get(user) == password, handled=False,
                          auth_data=auth_data)

    async def _record(self, record: Transaction) -> None:
        self.transactions.append(record)
        await self._changed()

    async def _changed(self) -> None:
        async with self._condition:
            self._condition.notify_all()


@contextlib.asynccontextmanager
async def running_sink(**kwargs: Any) -> AsyncIterator[Sink]:
    """A started sink (``Sink(**kwargs)``), stopped on exit."""
    sink = Sink(**kwargs)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()
