"""Asyncio SMTP load generator that records per-message accept latency.

Same workload shape as Postfix's smtp-source: N messages over S parallel sessions, a
body of a given size, R recipients per message, no command pipelining, and each
session reusing its connection (smtp-source ``-d``) unless told otherwise. Latency is
the time from sending MAIL FROM to reading the 250 reply after the final dot. It only
sends to loopback addresses, and it stops after N messages or when the timeout expires.

Unlike smtp-source it can send a given message (``--body-file``: headers and body as
they should arrive; it is dot-stuffed and CRLF-terminated here, and each copy gets its
own ``Date`` and ``Message-Id`` on top) and spread each message's recipients over
``--domains D`` domains (``d0.bench.example`` ... in turn).

Run with ``python -m bench.loadgen --port 2625 -n 5000 -s 20 --size 1024 -r 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from email.utils import formatdate
from pathlib import Path

SENDER = "sender@bench.example"
RECIPIENT_DOMAIN = "bench.example"
HELO_NAME = "loadgen.bench.example"
_MAX_REPLY_LINES = 64
_LINE = 78  # characters of body per line, before CRLF


class SmtpError(RuntimeError):
    """The server sent an unexpected reply or closed the connection."""


@dataclass(frozen=True)
class LoadgenResult:
    """Outcome of one load generator run; latencies are in milliseconds."""

    messages: int
    sessions: int
    size: int
    recipients: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_seconds: float  # this process's CPU time during the run: the generator's own cost


def check_loopback(host: str) -> None:
    """Raise ValueError unless host is a loopback IP literal (no names, no DNS)."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to send to non-loopback address {host}")


def make_body(size: int) -> bytes:
    """Return ``max(size, 2)`` bytes of CRLF lines (80 bytes each) that need no dot-stuffing."""
    line = b"x" * _LINE + b"\r\n"
    full, rest = divmod(max(size, 2), len(line))
    if rest == 0:
        return line * full
    if rest == 1:  # a line cannot be 1 byte long: lengthen the last full line instead
        return line * (full - 1) + b"x" * (_LINE + 1) + b"\r\n"
    return line * full + b"x" * (rest - 2) + b"\r\n"


def prepare_content(message: bytes) -> bytes:
    """A message as DATA sends it: CRLF line ends, leading dots doubled, ending in CRLF."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines)


def recipient(seq: int, n: int, recipients: int, domains: int = 0) -> str:
    """The ``n``-th (1-based) recipient of message ``seq``: unique over the run; with
    ``domains`` the message's recipients take the domains d0..d{domains-1} in turn."""
    domain = f"d{(n - 1) % domains}.{RECIPIENT_DOMAIN}" if domains else RECIPIENT_DOMAIN
    return f"{seq * recipients + n}r@{domain}"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty list)."""
    if not sorted_values:
        return 0.0
    rank = max(math.ceil(q * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _expect(reader: asyncio.StreamReader, first_digit: bytes) -> None:
    """Read one (possibly multi-line) SMTP reply and check its first digit."""
    for _ in range(_MAX_REPLY_LINES):
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed by server")
        if line[3:4] != b"-":
            if not line.startswith(first_digit):
                raise SmtpError(f"unexpected reply: {line!r}")
            return
    raise SmtpError("reply has too many lines")


class _Session:
    """One SMTP connection that sends messages one transaction at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Session:
        reader, writer = await asyncio.open_connection(host, port)
        session = cls(reader, writer)
        try:
            await _expect(reader, b"2")
            await session.command(b"EHLO " + HELO_NAME.encode(), b"2")
        except BaseException:
            writer.transport.abort()
            raise
        return session

    async def command(self, line: bytes, first_digit: bytes) -> None:
        self.writer.write(line + b"\r\n")
        await _expect(self.reader, first_digit)

    async def send(
        self, seq: int, recipients: int, body: bytes, *, content: bool = False, domains: int = 0
    ) -> float:
        """Send one message; return seconds from MAIL FROM to the final 250.

        ``body`` follows our own From/To/Date/Message-Id header, or with ``content`` it is
        the whole prepared message (``prepare_content``) after a Date and Message-Id.
        """
        started = time.perf_counter()
        await self.command(f"MAIL FROM:<{SENDER}>".encode(), b"2")
        for n in range(1, recipients + 1):
            rcpt = recipient(seq, n, recipients, domains)
            await self.command(f"RCPT TO:<{rcpt}>".encode(), b"2")
        await self.command(b"DATA", b"3")
        header = f"Date: {formatdate()}\r\nMessage-Id: <{seq}.{started}@{HELO_NAME}>\r\n"
        if not content:
            header = f"From: <{SENDER}>\r\nTo: <r@{RECIPIENT_DOMAIN}>\r\n{header}\r\n"
        self.writer.write(header.encode())
        self.writer.write(body)
        self.writer.write(b".\r\n")
        await self.writer.drain()
        await _expect(self.reader, b"2")
        return time.perf_counter() - started

    async def close(self) -> None:
        """QUIT and close within 5 s; drop the connection if that fails or stalls."""
        try:
            async with asyncio.timeout(5):
                await self.command(b"QUIT", b"2")
                self.writer.close()
                await self.writer.wait_closed()
        except (OSError, SmtpError, TimeoutError):
            self.writer.transport.abort()


async def _worker(
    host: str,
    port: int,
    take: Callable[[], int | None],
    limit: int,
    recipients: int,
    body: bytes,
    reuse_connections: bool,
    latencies: list[float],
    content: bool = False,
    domains: int = 0,
) -> None:
    session: _Session | None = None
    try:
        for _ in range(limit):
            seq = take()
            if seq is None:
                return
            if session is None:
                session = await _Session.open(host, port)
            latencies.append(
                await session.send(seq, recipients, body, content=content, domains=domains)
            )
            if not reuse_connections:
                await session.close()
                session = None
    finally:
        if session is not None:
            await session.close()


async def loadgen(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    reuse_connections: bool = True,
    timeout: float = 600.0,
    content: bytes | None = None,
    domains: int = 0,
) -> LoadgenResult:
    """Send ``messages`` messages over ``sessions`` parallel SMTP sessions to host:port.

    ``content``: send this message (headers and body) instead of ``size`` bytes of ours;
    ``domains``: spread each message's recipients over that many domains.
    """
    check_loopback(host)
    if min(messages, sessions, recipients) < 1 or size < 0 or domains < 0:
        raise ValueError("messages, sessions and recipients must be >= 1, size >= 0")
    body = make_body(size) if content is None else prepare_content(content)
    size = size if content is None else len(body)
    remaining = iter(range(messages))

    def take() -> int | None:
        return next(remaining, None)

    latencies: list[float] = []
    cpu_before = time.process_time()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            for _ in range(min(sessions, messages)):
                group.create_task(
                    _worker(
                        host, port, take, messages, recipients, body, reuse_connections,
                        latencies, content is not None, domains,
                    )
                )
    except ExceptionGroup as group_error:  # report the first failing session's error
        raise group_error.exceptions[0] from group_error
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_before
    ordered = sorted(latencies)
    return LoadgenResult(
        messages=len(ordered),
        sessions=sessions,
        size=size,
        recipients=recipients,
        seconds=seconds,
        rate=len(ordered) / seconds,
        p50_ms=percentile(ordered, 0.50) * 1000,
        p99_ms=percentile(ordered, 0.99) * 1000,
        max_ms=(ordered[-1] if ordered else 0.0) * 1000,
        cpu_seconds=cpu_seconds,
    )


def run_loadgen(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    reuse_connections: bool = True,
    timeout: float = 600.0,
    content: bytes | None = None,
    domains: int = 0,
) -> LoadgenResult:
    """Blocking wrapper around :func:`loadgen`, on uvloop when it is installed."""
    coro = loadgen(
        host,
        port,
        messages=messages,
        sessions=sessions,
        size=size,
        recipients=recipients,
        reuse_connections=reuse_connections,
        timeout=timeout,
        content=content,
        domains=domains,
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> None:
    """CLI: run the load generator once and print its result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2625)
    parser.add_argument("-n", "--messages", type=int, default=5000)
    parser.add_argument("-s", "--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024, help="body bytes")
    parser.add_argument("-r", "--recipients", type=int, default=1)
    parser.add_argument("--no-reuse", action="store_true", help="one connection per message")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--body-file", type=Path, help="send this message (headers + body)")
    parser.add_argument("--domains", type=int, default=0, help="spread recipients over D domains")
    args = parser.parse_args(argv)
    result = run_loadgen(
        args.host,
        args.port,
        messages=args.messages,
        sessions=args.sessions,
        size=args.size,
        recipients=args.recipients,
        reuse_connections=not args.no_reuse,
        timeout=args.timeout,
        content=args.body_file.read_bytes() if args.body_file else None,
        domains=args.domains,
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
