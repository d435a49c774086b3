"""Seed incident 2 (bloated job payloads, an OOM crash loop) against a real node: I4.

A newsletter of 300 messages of 5 MB, each for a batch of 100 subscribers on one
destination, is submitted over SMTP by 10 concurrent sessions to ``mta serve`` (a
subprocess, delivery on, a static route to a recording sink on loopback) and delivered:
600 transactions of 50 recipients, 30,000 deliveries. The scheduler in the incident
needed 1.5 GB for this queue and died in a 512 MB dyno. Here every node process's peak
memory (``VmHWM``) stays below the bound that ``mta config check`` prints for the node's
own config file, and that bound is under 256 MiB, half of that dyno. Every body arrives
byte-identical.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.delivery import state_counts
from tests.support.digest_sink import (
    DigestSink,
    digested,
    running_digest_sink,
    split_message,
)
from tests.support.memory import node_processes, parse_memory_bound, status_bytes, vm_hwm_bytes
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess, run_mta, write_config
from tests.support.sink import running_sink
from tests.support.smtp import RawSMTP, dot_stuff, queue_id_of

MESSAGES = 300
SESSIONS = 10
PER_SESSION = MESSAGES // SESSIONS
RECIPIENTS = 100
DESTINATION = "example.com"
SENDER = "news@example.org"
#: Base64 lines of 76 characters plus CRLF: 67,216 of them make a 5 MiB body.
BODY_LINES = 5 * 1024 * 1024 // 78
RAW_PER_LINE = 57

#: Operator settings for 5 MB newsletters on a small host: room for 6 MiB messages,
#: 5 DATA phases and 2 sends at once, one process. The bound they give must be under
#: half of the 512 MB dyno that died.
MAX_MESSAGE_SIZE = 6 * 1024 * 1024
DATA_CONCURRENCY = 5
WORKERS = 2
PROCESSES = 1
GOAL_BYTES = 256 * 1024 * 1024

#: Client attempts per message; a 4xx (no DATA slot in time, store busy) is retried,
#: as any SMTP client retries a temporary failure.
MAX_TRIES = 30
#: Seconds for submission and delivery together (about 50-70 s on a 2-core VM).
DEADLINE_S = 170.0
HELO = "client.test"


def recipients_of(n: int) -> list[str]:
    """Message ``n``'s batch: 100 distinct subscribers, all on one destination."""
    return [f"sub{n * RECIPIENTS + k:05d}@{DESTINATION}" for k in range(RECIPIENTS)]


def message_id_of(n: int) -> str:
    return f"bloat-{n}@test.invalid"


def make_message(n: int) -> tuple[bytes, bytes]:
    """Message ``n``'s header section and body: seeded random bytes as MIME base64."""
    headers = (
        f"From: Newsletter <{SENDER}>\r\n"
        "To: undisclosed-recipients:;\r\n"
        f"Subject: Issue {n}\r\n"
        f"Message-ID: <{message_id_of(n)}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n"
    ).encode()
    encoded = base64.b64encode(random.Random(n).randbytes(BODY_LINES * RAW_PER_LINE))
    lines = [encoded[start:start + 76] for start in range(0, len(encoded), 76)]
    return headers, b"\r\n".join(lines) + b"\r\n"


@dataclass(frozen=True)
class Submitted:
    """What the test keeps of one accepted message: no body, only its digest."""

    n: int
    queue_id: str
    headers: bytes
    body_sha256: str
    size: int


@dataclass
class Ledger:
    """Accepted messages by Message-ID, and the temporary failures clients retried."""

    accepted: dict[str, Submitted] = field(default_factory=dict)
    retried: list[str] = field(default_factory=list)


async def submit_one(smtp: RawSMTP, n: int, ledger: Ledger) -> None:
    """MAIL, 100 RCPT and DATA pipelined (PIPELINING is offered); retry on a 4xx."""
    headers, body = make_message(n)
    data = dot_stuff(headers + b"\r\n" + body)
    body_sha256, size = hashlib.sha256(body).hexdigest(), len(headers) + 2 + len(body)
    del body
    commands = [f"MAIL FROM:<{SENDER}> SIZE={len(data)}",
                *(f"RCPT TO:<{rcpt}>" for rcpt in recipients_of(n)), "DATA"]
    batch = ("\r\n".join(commands) + "\r\n").encode()
    for _ in range(MAX_TRIES):
        await smtp.send(batch)
        replies = [await smtp.reply(timeout=60) for _ in commands]
        for reply in replies[:-1]:
            assert reply.startswith("250"), (n, reply)
        if replies[-1].startswith("4"):
            ledger.retried.append(f"{n} DATA: {replies[-1]}")
            continue
        assert replies[-1].startswith("354"), (n, replies[-1])
        await smtp.send(data + b".\r\n")
        final = await smtp.reply(timeout=60)
        if final.startswith("4"):
            ledger.retried.append(f"{n} dot: {final}")
            continue
        ledger.accepted[message_id_of(n)] = Submitted(n, queue_id_of(final), headers,
                                                      body_sha256, size)
        return
    raise AssertionError(f"message {n} not accepted in {MAX_TRIES} tries: "
                         f"{ledger.retried[-5:]}")


async def submit_session(port: int, session: int, ledger: Ledger) -> None:
    """One client session that submits its 30 messages one after another."""
    smtp = await RawSMTP.connect(port)
    try:
        ehlo = await smtp.cmd(f"EHLO {HELO}")
        assert "PIPELINING" in ehlo and f"SIZE {MAX_MESSAGE_SIZE}" in ehlo, ehlo
        for k in range(PER_SESSION):
            await submit_one(smtp, session * PER_SESSION + k, ledger)
        assert (await smtp.cmd("QUIT")).startswith("221")
    finally:
        await smtp.close()


def received_line(queue_id: str) -> re.Pattern[bytes]:
    """The one trace header intake prepends (mta/intake/trace.py); only the date varies."""
    return re.compile(
        rb"Received: from " + re.escape(HELO.encode()) + rb" \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby mx\.test\.invalid \(mta-fleet\) with ESMTP id " + re.escape(queue_id.encode())
        + rb"; [^\r\n]+\r\n")


@pytest.fixture
async def sink() -> AsyncIterator[DigestSink]:
    async with running_digest_sink() as running:
        yield running


@pytest.mark.slow
async def test_newsletter_of_300_5mb_messages_stays_within_the_printed_memory_bound(
    tmp_path: Path, db_dsn: str, sink: DigestSink,
) -> None:
    node = NodeProcess.configure(
        tmp_path / "node", db_dsn,
        node={"workers": WORKERS, "processes": PROCESSES},
        smtp={"max_message_size": MAX_MESSAGE_SIZE, "data_concurrency": DATA_CONCURRENCY},
        delivery={"enabled": True, "poll_interval": 1.0, "routes": [
            {"domain": DESTINATION, "host": "127.0.0.1", "port": sink.port, "tls": "none"}]},
    )
    # The operator's check, on the very file the node will run with.
    write_config(node.config_path, node.sections)
    check = await run_mta("config", "check", "--config", str(node.config_path))
    assert check.returncode == 0, check.stderr
    bound = parse_memory_bound(check.stdout)
    assert bound < GOAL_BYTES, check.stdout

    await node.start()
    try:
        started = time.monotonic()
        ledger = Ledger()
        await asyncio.wait_for(
            asyncio.gather(*(submit_session(node.smtp_port, s, ledger) for s in range(SESSIONS))),
            DEADLINE_S)
        submitted_s = time.monotonic() - started
        assert len(ledger.accepted) == MESSAGES

        remaining = DEADLINE_S - (time.monotonic() - started)
        await sink.wait_until(lambda s: s.deliveries() >= MESSAGES * RECIPIENTS, remaining)

        async def all_delivered() -> bool:
            return await state_counts(db_dsn) == {"delivered": MESSAGES * RECIPIENTS}

        await wait_for(all_delivered, DEADLINE_S - (time.monotonic() - started), interval=0.25)
        delivered_s = time.monotonic() - started

        # VmHWM is a high-water mark: read at the end, while the node still runs.
        assert node.process is not None and node.process.poll() is None, node.stderr_text()
        pids = node_processes(node.pid, PROCESSES)
        peaks = {pid: vm_hwm_bytes(pid) for pid in pids}
        rss = {pid: status_bytes(pid, "VmRSS") for pid in pids}
        print(f"\npayload bloat: submitted in {submitted_s:.1f} s, all delivered after "
              f"{delivered_s:.1f} s; bound {bound / 2**20:.1f} MiB; VmHWM "
              f"{ {pid: f'{peak / 2**20:.1f} MiB' for pid, peak in peaks.items()} }; VmRSS "
              f"{ {pid: f'{size / 2**20:.1f} MiB' for pid, size in rss.items()} }; "
              f"{len(sink.transactions)} transactions; {len(ledger.retried)} client retries")
        for pid, peak in peaks.items():
            assert peak < bound, (f"process {pid}: VmHWM {peak / 2**20:.1f} MiB over the "
                                  f"printed bound {bound / 2**20:.1f} MiB")

        node.signal(signal.SIGTERM)
        assert await node.wait_exit(30) == 0, node.stderr_text()
    finally:
        await node.close()

    errors = [e for e in node.events() if e.get("level") in ("error", "critical")]
    assert not errors, errors[:5]

    transactions = sink.digests()
    assert len(transactions) == len(sink.transactions)
    # Every transaction carries one accepted message, byte-identical, to its recipients.
    for got in transactions:
        sent = ledger.accepted.get(got.message_id or "")
        assert sent is not None, f"unknown Message-ID {got.message_id}"
        assert got.received and got.reply is not None and got.reply.startswith("250")
        assert got.mail_from == SENDER
        assert set(got.recipients) <= set(recipients_of(sent.n)), got.message_id
        # Delivered = the node's Received: line, then exactly what was submitted.
        assert got.headers.endswith(sent.headers), (got.message_id, got.headers[:400])
        trace = got.headers[:len(got.headers) - len(sent.headers)]
        assert received_line(sent.queue_id).fullmatch(trace), (got.message_id, trace)
        assert got.size == len(trace) + sent.size, got.message_id
        assert got.body_sha256 == sent.body_sha256, f"{got.message_id}: body differs"
    # Every subscriber got every message of theirs exactly once.
    received = Counter((t.message_id, rcpt) for t in transactions for rcpt in t.recipients)
    assert len(received) == MESSAGES * RECIPIENTS
    assert max(received.values()) == 1, "no recipient got a message twice"
    # Each message's 100 subscribers go out as two transactions of 50
    # (delivery.recipients_per_transaction's default): 600, not 300 x k.
    count, shape = len(transactions), dict(Counter(len(t.recipients) for t in transactions))
    assert count == 2 * MESSAGES and shape == {RECIPIENTS // 2: 2 * MESSAGES}, (
        f"{count} transactions for {MESSAGES} messages of {RECIPIENTS} recipients each; "
        f"recipients per transaction: {shape}")


def test_make_message_is_deterministic_and_about_5_mb() -> None:
    headers, body = make_message(7)
    again = make_message(7)
    assert (headers, body) == again
    assert make_message(8)[1] != body
    whole = headers + b"\r\n" + body
    assert 5_000_000 < len(whole) < MAX_MESSAGE_SIZE
    assert split_message(whole) == (headers, body)
    assert max(len(line) for line in body.split(b"\r\n")) == 76


async def test_digest_sink_reads_data_as_the_aiosmtpd_sink_does() -> None:
    """The bulk DATA reader sees the bytes aiosmtpd's line reader sees: dot-stuffing
    undone, pipelined commands after the dot left to the command reader."""
    message = (b"Message-ID: <dots@test.invalid>\r\nSubject: dots\r\n\r\n"
               b".leading dot\r\n..two dots\r\n.\r\n" + (b".x" * 35 + b"\r\n") * 8000
               + b". \r\nend\r\n")
    async with running_sink() as plain, running_digest_sink() as digest:
        for port in (plain.port, digest.port):
            smtp = await RawSMTP.connect(port)
            try:
                await smtp.cmd("EHLO client.test")
                await smtp.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                                b"DATA\r\n")
                assert [await smtp.reply() for _ in range(3)][2].startswith("354")
                await smtp.send(dot_stuff(message) + b".\r\nNOOP\r\n")
                assert (await smtp.reply()).startswith("250")
                assert (await smtp.reply()).startswith("250"), "pipelined NOOP answered"
            finally:
                await smtp.close()
        assert plain.transactions[0].data == message
        expected, = (digested(t) for t in plain.transactions)
        got, = digest.digests()
    assert (got.headers, got.body_sha256, got.size) == (
        expected.headers, expected.body_sha256, expected.size)
    assert (got.mail_from, got.recipients, got.message_id, got.reply) == (
        expected.mail_from, expected.recipients, expected.message_id, expected.reply)
    assert got.data == b""
