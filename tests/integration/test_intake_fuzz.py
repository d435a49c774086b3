"""Intake under random input: never an internal error, always answering, 250 means stored.

Hypothesis drives one running node per test. The node lives in the test's event loop;
the examples run in a worker thread and hand each session to that loop, so the node is
started once per test function and not once per example.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.config import Settings
from mta.intake import replies
from mta.queue.ids import parse_queue_id
from tests.support.intake import running_node, store_of, stored_content
from tests.support.nodes import NodeHandle
from tests.support.smtp import RawSMTP, dot_stuff, queue_id_of

MAX_SIZE = 12_000
MAX_LINE = 200
MAX_RECEIVED = 3
FUZZ_SMTP = {"max_message_size": MAX_SIZE, "max_line_length": MAX_LINE,
             "max_received_headers": MAX_RECEIVED, "max_recipients": 4}
REPLY_TIMEOUT = 5.0
EXAMPLE_TIMEOUT = 60.0
_INTERNAL = re.compile(r"^500 Error: \(", re.MULTILINE)
_REPLY_LINE = re.compile(r"^[2-5][0-9][0-9]([ -].*)?$")
_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)


# --- what one session does ---------------------------------------------------------------


@dataclass(frozen=True)
class Lines:
    """Raw bytes in one write: one command, garbage, or a pipelined batch (never DATA)."""

    wire: bytes


@dataclass(frozen=True)
class Transaction:
    """MAIL, RCPT… and DATA (pipelined or one by one); the body if DATA gets 354,
    followed in the same write by ``after`` (pipelined commands, never DATA)."""

    sender: str
    recipients: tuple[str, ...]
    pipelined: bool
    body: bytes
    after: bytes


Action = Lines | Transaction


def command_lines(wire: bytes) -> list[bytes]:
    """The lines aiosmtpd reads from ``wire``: it splits on LF."""
    return wire.split(b"\n")[:-1]


def starts_data(wire: bytes) -> bool:
    """True if a line of ``wire`` would be read as the DATA command."""
    return any(line.rstrip(b"\r\n").partition(b" ")[0].upper() == b"DATA"
               for line in command_lines(wire))


def sent_body(body: bytes) -> bytes:
    """What the server should store for ``body`` after ``dot_stuff`` (it ends in CRLF)."""
    return body if body.endswith(b"\r\n") else body + b"\r\n"


def expected_data_reply(body: bytes) -> str:
    """The reply prefix a correct intake gives to ``body`` (an oracle written apart)."""
    sent = sent_body(body)
    if len(dot_stuff(body)) > MAX_SIZE:
        return "552 5.3.4 "
    if sent.count(b"\n") != sent.count(b"\r\n") or sent.count(b"\r") != sent.count(b"\r\n"):
        return "550 5.5.2 "
    lines = sent.split(b"\r\n")[:-1]
    if any(len(line) > MAX_LINE for line in lines):
        return "500 5.5.2 "
    headers = []
    for line in lines:
        if not line:
            break
        headers.append(line)
    if sum(1 for line in headers if _RECEIVED.match(line)) >= MAX_RECEIVED:
        return "554 5.4.6 "
    return "250 2.0.0 Ok: queued as "


# --- strategies ----------------------------------------------------------------------------

ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r\r\n"])
GOOD_ADDRESSES = st.sampled_from([
    "<alice@example.org>", "<bob@example.com>", "<c.d+tag@sub.example.net>",
    '<"quoted name"@example.org>', "<postmaster@[192.0.2.1]>",
])
ODD_ADDRESSES = st.one_of(
    st.sampled_from(["<>", "", "<", ">", "<@>", "<a@>", "<a@b@c>", "a@example.org",
                     "<@route.example:a@example.org>", "<jörg@example.org>", "<a@example.org"]),
    st.text(max_size=40).map(lambda text: "<{}>".format(text.replace("\n", ""))),
)
ADDRESSES = st.one_of(GOOD_ADDRESSES, GOOD_ADDRESSES, ODD_ADDRESSES)
PARAMS = st.lists(st.sampled_from([
    "SIZE=100", "SIZE=99999999", "SIZE=x", "SIZE=", "BODY=8BITMIME", "BODY=7BIT",
    "BODY=BINARYMIME", "AUTH=<>", "SMTPUTF8", "RET=HDRS", "NOTIFY=NEVER", "=x", "x=\x7f",
]), max_size=3).map(lambda params: "".join(" " + param for param in params))
HOSTNAMES = st.one_of(st.sampled_from(["client.test", "[127.0.0.1]", "x"]), st.text(max_size=30))
COMMANDS = st.one_of(
    st.builds(lambda verb, host: f"{verb} {host}", st.sampled_from(["EHLO", "HELO", "ehlo"]),
              HOSTNAMES),
    st.builds(lambda verb, path, params: f"{verb}{path}{params}",
              st.sampled_from(["MAIL FROM:", "mail from:", "MAIL FROM: ", "MAIL TO:"]),
              ADDRESSES, PARAMS),
    st.builds(lambda verb, path, params: f"{verb}{path}{params}",
              st.sampled_from(["RCPT TO:", "rcpt to:", "RCPT FROM:"]), ADDRESSES, PARAMS),
    st.sampled_from([
        "RSET", "RSET x", "NOOP", "NOOP hello", "VRFY alice", "EXPN list", "HELP", "HELP MAIL",
        "STARTTLS", "AUTH", "AUTH PLAIN", "AUTH PLAIN AGEAYg==", "AUTH LOGIN", "AUTH CRAM-MD5",
        "AUTH PLAIN !!!", "QUIT", "BDAT 10 LAST", "ETRN example.org", "TURN", "", " ", "DATA2",
    ]),
).map(lambda line: line.encode("utf-8"))
GARBAGE = st.binary(max_size=200)
LONG_LINES = st.integers(400, 2500).map(lambda n: b"X" * n)
LINE = st.tuples(st.one_of(COMMANDS, COMMANDS, GARBAGE, LONG_LINES), ENDINGS).map(
    lambda pair: pair[0] + pair[1]
)
BATCH = st.lists(LINE, min_size=1, max_size=6).map(b"".join).filter(
    lambda wire: not starts_data(wire)
)

CLEAN_LINE = st.binary(max_size=90).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
SPECIAL_LINE = st.sampled_from([
    b"", b".", b"..", b"...", b".x", b". ", b"Subject: fuzz", b"Received: from a by b",
    b"received:x", b"RECEIVED \t: y", b"Message-ID: <fuzz@client.test>", b" folded",
])
EDGE_LINE = st.integers(MAX_LINE - 2, MAX_LINE + 2).flatmap(
    lambda n: st.sampled_from([b"L" * n, b"." + b"L" * (n - 1)])
)
LINES_BODY = st.lists(st.one_of(CLEAN_LINE, SPECIAL_LINE, SPECIAL_LINE, EDGE_LINE),
                      max_size=25).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
BIG_BODY = st.integers(MAX_SIZE - 250, MAX_SIZE + 250).map(
    lambda n: b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * ((n - 16) // 100)
    + b"z" * ((n - 16) % 100)
)
HOPS_BODY = st.tuples(st.integers(0, MAX_RECEIVED + 1), LINES_BODY).map(
    lambda pair: b"Received: from a.example by b.example\r\n" * pair[0] + pair[1]
)
BODIES = st.one_of(LINES_BODY, LINES_BODY, HOPS_BODY, st.binary(max_size=600), BIG_BODY)
AFTER = st.one_of(st.just(b""), BATCH)

TRANSACTIONS = st.builds(
    Transaction,
    sender=st.one_of(GOOD_ADDRESSES, ADDRESSES),
    recipients=st.lists(st.one_of(GOOD_ADDRESSES, ADDRESSES), min_size=1, max_size=5).map(tuple),
    pipelined=st.booleans(),
    body=BODIES,
    after=AFTER,
)
ACTIONS = st.one_of(BATCH.map(Lines), TRANSACTIONS)


# --- running a session -----------------------------------------------------------------------


def assert_sane(reply: str) -> None:
    """A well-formed reply that is not an internal error."""
    assert not _INTERNAL.search(reply), reply
    assert "Traceback" not in reply, reply
    assert reply != replies.INTERNAL_ERROR, "an unexpected exception inside intake"
    for line in reply.split("\n"):
        assert _REPLY_LINE.match(line), f"malformed reply line {line!r}"


def closes_session(reply: str) -> bool:
    return reply.startswith(("421 ", "221 ", "502 5.5.1 Too many unrecognized"))


class Session:
    """One client session; records every ``250 … queued as`` with the body it was for."""

    def __init__(self, client: RawSMTP) -> None:
        self.client = client
        self.open = True
        self.accepted: list[tuple[str, bytes]] = []

    async def read(self, count: int) -> list[str]:
        """Read ``count`` replies, fewer if one of them closes the session."""
        got = []
        for _ in range(count):
            reply = await self.client.reply(REPLY_TIMEOUT)
            assert_sane(reply)
            got.append(reply)
            if closes_session(reply):
                rest = await asyncio.wait_for(self.client.reader.read(), REPLY_TIMEOUT)
                assert rest == b"", f"{rest!r} after {reply!r}"
                self.open = False
                break
        return got

    async def lines(self, wire: bytes) -> list[str]:
        await self.client.send(wire)
        return await self.read(wire.count(b"\n"))

    async def run(self, action: Action) -> None:
        if isinstance(action, Lines):
            await self.lines(action.wire)
            return
        commands = [f"MAIL FROM:{action.sender}".encode(),
                    *(f"RCPT TO:{rcpt}".encode() for rcpt in action.recipients), b"DATA"]
        if action.pipelined:
            got = await self.lines(b"".join(line + b"\r\n" for line in commands))
        else:
            got = []
            for line in commands:
                got += await self.lines(line + b"\r\n")
                if not self.open:
                    break
        if not self.open or got[-1] != replies.START_DATA:
            return
        await self.client.send(dot_stuff(action.body) + b".\r\n" + action.after)
        [final] = await self.read(1)
        expected = expected_data_reply(action.body)
        assert final.startswith(expected), (final, expected)
        if final.startswith("250 "):
            self.accepted.append((final, sent_body(action.body)))
        if self.open:
            await self.read(action.after.count(b"\n"))


async def run_example(node: NodeHandle, actions: list[Action], ehlo: bool) -> None:
    """One session of ``actions``; then the store and a fresh session are checked."""
    store = store_of(node)
    before = await store.message_count()
    client = await RawSMTP.connect(node.port)
    assert client.greeting.startswith("220 "), client.greeting
    session = Session(client)
    if ehlo:
        await session.lines(b"EHLO fuzz.test\r\n")
    for action in actions:
        await session.run(action)
        if not session.open:
            break
    else:
        assert await session.lines(b"QUIT\r\n") == [replies.CLOSING]
    await client.close()

    assert await store.message_count() - before == len(session.accepted), (
        "every stored message got a 250, and every 250 is stored"
    )
    for reply, body in session.accepted:
        _, stored = await stored_content(node, reply)
        assert stored == body

    fresh = await RawSMTP.connect(node.port)
    assert fresh.greeting.startswith("220 "), fresh.greeting
    assert await fresh.cmd("NOOP") == replies.OK
    await fresh.close()


def in_loop(loop: asyncio.AbstractEventLoop,
            make: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """A blocking function (for Hypothesis' thread) that runs ``make(...)`` on ``loop``."""
    def run(*args: Any) -> None:
        asyncio.run_coroutine_threadsafe(make(*args), loop).result(EXAMPLE_TIMEOUT)
    return run


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


async def test_random_sessions_get_no_internal_error_and_every_250_is_stored(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_node(make_settings(smtp=FUZZ_SMTP)) as node:
        run = in_loop(asyncio.get_running_loop(), run_example)

        @FUZZ
        @given(actions=st.lists(ACTIONS, min_size=1, max_size=8), ehlo=st.booleans())
        def sessions(actions: list[Action], ehlo: bool) -> None:
            run(node, actions, ehlo)

        await asyncio.to_thread(sessions)


async def test_random_payloads_are_stored_byte_identical_or_refused_exactly(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_node(make_settings(smtp=FUZZ_SMTP)) as node:
        run = in_loop(asyncio.get_running_loop(), run_example)
        valid = st.builds(Transaction, sender=GOOD_ADDRESSES,
                          recipients=st.lists(GOOD_ADDRESSES, min_size=1, max_size=3).map(tuple),
                          pipelined=st.booleans(), body=BODIES, after=AFTER)

        @FUZZ
        @given(actions=st.lists(valid, min_size=1, max_size=4))
        def payloads(actions: list[Action]) -> None:
            run(node, actions, True)

        await asyncio.to_thread(payloads)


# --- regressions the fuzzing found -----------------------------------------------------------


async def test_helo_with_nul_and_invalid_utf8_is_stored_as_printable_text(
    node: NodeHandle,
) -> None:
    client = await RawSMTP.connect(node.port)
    await client.send(b"EHLO a\x00b\xff\r\n")
    assert (await client.reply()).startswith("250-")
    reply = await client.submit("alice@example.org", ["bob@example.com"], b"Subject: x\r\n\r\n")
    await client.close()
    trace, _ = await stored_content(node, reply)
    assert trace.startswith(b"Received: from a?b? ([127.0.0.1])")
    record = await store_of(node).message(parse_queue_id(queue_id_of(reply)))
    assert record is not None and record.helo_name == "a?b?"


async def test_message_id_with_nul_is_recorded_without_it(node: NodeHandle) -> None:
    body = b"Message-ID: <a\x00b@client.test>\r\n\r\nbody\r\n"
    client = await RawSMTP.connect(node.port)
    await client.cmd("EHLO client.test")
    reply = await client.submit("alice@example.org", ["bob@example.com"], body)
    await client.close()
    _, stored = await stored_content(node, reply)
    assert stored == body
    record = await store_of(node).message(parse_queue_id(queue_id_of(reply)))
    assert record is not None and record.message_id_header == "<ab@client.test>"


async def test_sessions_run_with_tcp_nodelay_so_pipelined_replies_are_not_held(
    node: NodeHandle,
) -> None:
    client = await RawSMTP.connect(node.port)
    intake = node.node.intake
    assert intake is not None
    [session] = intake._sessions  # the one open session's server side
    assert session.transport is not None
    sock = session.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    await client.close()
