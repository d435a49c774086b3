"""Workloads of the suite beyond bench.relay's three, each run by mta-fleet and by Postfix.

* ``postfix-client``: a private Postfix with ``relayhost = [127.0.0.1]:<node port>``
  takes N x 1 KiB messages from smtp-source and relays them into the node, which relays
  them to smtp-sink; beside it the same client Postfix relays into a second, relaying
  Postfix instead. While the load runs, ``probe`` (one SMTP session of our own) times
  each command of T transactions (EHLO, MAIL, RCPT, DATA, the dot, RSET) against the
  node, and against the relaying Postfix.
* ``newsletter``: one 100 KB MIME message (HTML part and a base64 attachment of seeded
  pseudo-random bytes) to R recipients over 50 domains, submitted as R/1000 messages of
  1000 recipients by ``bench.loadgen``; everything goes to one smtp-sink.
* ``realistic-1m``: N messages of 1 MiB (HTML part and a base64 PDF-like attachment,
  seeded pseudo-random bytes), 20 sessions, by ``bench.loadgen`` on both sides.

Every run returns a ``SideRun``: the rate (units/s: messages, or deliveries for the
newsletter), CPU seconds of the side (``bench.cpu``: the node with its embedded
PostgreSQL, or every process of the relaying Postfix; never smtp-sink, which is counted
apart, nor the load generator), loss and duplicates. Node side: the store check of
``bench.relay`` (every delivery delivered once, sink transactions = recorded ones).
Postfix side: its maillog (every recipient ``status=sent`` exactly once, nothing else),
its queue empty at the end, and the sink's count.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate
from pathlib import Path
from typing import Any

from bench.cpu import TreeCpu, node_pids
from bench.intake import NODE_PORT, running_node
from bench.loadgen import HELO_NAME, RECIPIENT_DOMAIN, SENDER, _expect, make_body, run_loadgen
from bench.postfix_side import (
    CpuMeter,
    PostfixInstance,
    SmtpSink,
    _poll,
    run_smtp_source,
    start_postfix,
    start_smtp_sink,
    workdir,
)
from bench.relay import (
    POSTFIX_PORT,
    POSTFIX_SINK_PORT,
    SETTLE_TIMEOUT_S,
    SINK_PORT,
    _keep_evidence,
    _log_events,
    _node_settings,
    _store_check,
    delivery_config,
    wait_until_final,
)
from mta.queue import EmbeddedPostgres

#: The client Postfix of ``postfix-client`` (its own smtp-sink stays idle).
CLIENT_PORT = 2635
CLIENT_SINK_PORT = 2636
CLIENT_HOSTNAME = "postfix-client.invalid"  # not the relay's: Postfix refuses to loop
PROBE_COMMANDS = ("EHLO", "MAIL", "RCPT", "DATA", "dot", "RSET")
NEWSLETTER_DOMAINS = 50
NEWSLETTER_BATCH = 1000  # smtp.max_recipients and smtpd_recipient_limit, both defaults
NEWSLETTER_SESSIONS = 5
NEWSLETTER_SIZE = 100 * 1024
REALISTIC_SIZE = 1 << 20
REALISTIC_SESSIONS = 20


# --- message bodies --------------------------------------------------------------------

_WORDS = ("account", "offer", "update", "weekly", "product", "news", "customer", "team",
          "release", "feature", "discount", "event", "report", "invoice", "thanks", "today",
          "summer", "support", "delivery", "order", "members", "details", "more", "now")


def _html(size: int, rng: random.Random, title: str) -> str:
    """About ``size`` bytes of HTML in lines of at most 76 characters (7bit, no dots)."""
    lines = ["<!DOCTYPE html>", f"<html><head><title>{title}</title></head>",
             "<body>"]
    total = sum(len(line) + 2 for line in lines)
    while total < size - 20:
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 10)))
        line = f"<p>{words.capitalize()}.</p>"
        lines.append(line)
        total += len(line) + 2
    lines.append("</body></html>")
    return "\r\n".join(lines) + "\r\n"


def _pdf_like(size: int, rng: random.Random) -> bytes:
    """A PDF-shaped blob: a header, one stream of pseudo-random bytes, a trailer."""
    head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    tail = b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    n = max(size - len(head) - len(tail) - 60, 0)
    stream = f"3 0 obj\n<< /Length {n} /Filter /FlateDecode >>\nstream\n".encode()
    return head + stream + rng.randbytes(n) + tail


def mime_message(size: int, *, html_bytes: int, seed: int, subject: str,
                 filename: str) -> bytes:
    """A multipart/mixed message of about ``size`` bytes (CRLF): an HTML part of about
    ``html_bytes`` and a base64 ``application/pdf`` attachment of seeded pseudo-random
    bytes. The same arguments give the same bytes."""

    def build(raw: int) -> bytes:
        rng = random.Random(seed)
        msg = EmailMessage(policy=SMTP)
        msg["From"] = f"Bench News <{SENDER}>"
        msg["To"] = "undisclosed-recipients:;"
        msg["Subject"] = subject
        msg.set_content(_html(html_bytes, rng, subject), subtype="html", cte="7bit")
        msg.add_attachment(_pdf_like(raw, rng), maintype="application", subtype="pdf",
                           filename=filename)
        msg.set_boundary(f"=_bench_{seed}_boundary")
        return msg.as_bytes()

    # base64 makes 4 characters of 3 bytes, in lines of 76 plus CRLF
    raw = max(int((size - html_bytes - 600) * 3 / 4 * 76 / 78), 0)
    for _ in range(3):
        data = build(raw)
        raw = max(raw + int((size - len(data)) * 3 / 4 * 76 / 78), 0)
    return data


def newsletter_message() -> bytes:
    """The newsletter: about 100 KB, a 30 KB HTML part and a base64 attachment."""
    return mime_message(NEWSLETTER_SIZE, html_bytes=30 * 1024, seed=13,
                        subject="Bench newsletter", filename="catalogue.pdf")


def realistic_message() -> bytes:
    """The realistic 1 MiB message: a 20 KB HTML part and a base64 PDF-like attachment."""
    return mime_message(REALISTIC_SIZE, html_bytes=20 * 1024, seed=1313,
                        subject="Your monthly statement", filename="statement.pdf")


# --- the per-command latency probe -----------------------------------------------------

@dataclass
class ProbeResult:
    """Per-command reply times of one session's transactions, and when each ended."""

    port: int
    transactions: int = 0
    started: float = 0.0
    ended: list[float] = field(default_factory=list)
    times: dict[str, list[float]] = field(
        default_factory=lambda: {c: [] for c in PROBE_COMMANDS})
    error: str | None = None

    def summary(self, load_done: float) -> dict[str, Any]:
        """Median ms per command over the transactions that ended while the load ran
        (all of them when fewer than 10 did), and how many that were."""
        under = [i for i, end in enumerate(self.ended) if end <= load_done]
        basis = under if len(under) >= 10 else list(range(len(self.ended)))
        medians = {c: round(statistics.median(self.times[c][i] for i in basis) * 1000, 3)
                   for c in PROBE_COMMANDS} if basis else {}
        return {"port": self.port, "transactions": len(self.ended),
                "under_load": len(under), "median_ms": medians,
                "basis": "under load" if basis is under else "all", "error": self.error}


async def _probe(result: ProbeResult, transactions: int, ready: Callable[[], bool]) -> None:
    for _ in range(500):  # start once the relay is busy (at most 5 s)
        if ready():
            break
        await asyncio.sleep(0.01)
    result.started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", result.port)
    body = make_body(1024)
    try:
        async with asyncio.timeout(300):
            await _expect(reader, b"2")
            for i in range(transactions):
                header = (f"From: <{SENDER}>\r\nTo: <probe{i}@{RECIPIENT_DOMAIN}>\r\n"
                          f"Date: {formatdate()}\r\nMessage-Id: <probe{i}.{time.time()}"
                          f"@{HELO_NAME}>\r\n\r\n").encode()
                steps = (
                    ("EHLO", [b"EHLO " + HELO_NAME.encode() + b"\r\n"], b"2"),
                    ("MAIL", [f"MAIL FROM:<{SENDER}>\r\n".encode()], b"2"),
                    ("RCPT", [f"RCPT TO:<probe{i}@{RECIPIENT_DOMAIN}>\r\n".encode()], b"2"),
                    ("DATA", [b"DATA\r\n"], b"3"),
                    ("dot", [header, body, b".\r\n"], b"2"),
                    ("RSET", [b"RSET\r\n"], b"2"),
                )
                for name, chunks, digit in steps:
                    started = time.perf_counter()
                    writer.writelines(chunks)
                    await writer.drain()
                    await _expect(reader, digit)
                    result.times[name].append(time.perf_counter() - started)
                result.ended.append(time.perf_counter())
            writer.write(b"QUIT\r\n")
            await writer.drain()
            await _expect(reader, b"2")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.contextmanager
def probing(port: int, transactions: int, ready: Callable[[], bool]) -> Iterator[ProbeResult]:
    """Run the probe in a thread of its own (own event loop) during the block; the
    block's end waits for it (at most 300 s)."""
    result = ProbeResult(port)
    if transactions <= 0:
        yield result
        return

    def run() -> None:
        try:
            asyncio.run(_probe(result, transactions, ready))
        except Exception as exc:  # reported in the result; the run's checks catch the rest
            result.error = repr(exc)

    thread = threading.Thread(target=run, daemon=True, name="probe")
    thread.start()
    try:
        yield result
    finally:
        thread.join(timeout=310)


# --- results ---------------------------------------------------------------------------

@dataclass
class SideRun:
    """One workload on one side (``mta`` or ``postfix``)."""

    workload: str
    side: str
    #: What ``units`` counts: ``msg`` (messages through the relay) or ``delivery``.
    unit: str
    units: int
    seconds: float
    rate: float
    #: CPU seconds of the side (bench.cpu), and per unit.
    cpu_s: float
    cpu_s_per_unit: float
    sink_cpu_s: float
    #: Transactions (dots) the sink counted.
    sink_transactions: int
    loss: int
    duplicates: int
    ok: bool
    errors: list[str]
    other_cpu: float
    detail: dict[str, Any] = field(default_factory=dict)


def _rate(units: int, seconds: float) -> float:
    return units / seconds if seconds > 0 else 0.0


def node_loss_duplicates(check: dict[str, Any], expected: int) -> tuple[int, int]:
    """Loss and duplicates from a ``bench.relay`` store check of ``expected`` deliveries:
    deliveries not delivered; and possible duplicates, extra delivered events, and sink
    transactions beyond the ones the node recorded."""
    delivered = check["states"].get("delivered", 0)
    duplicates = (check["possible_duplicates"] + max(check["delivered_events"] - expected, 0)
                  + max(check["sink_messages"] - check["transactions"], 0))
    return max(expected - delivered, 0), duplicates


def postfix_check(instance: PostfixInstance, expected: int, sink_min: int,
                  sink_exact: int | None) -> tuple[int, int, list[str], dict[str, Any]]:
    """Loss, duplicates and errors on a Postfix side from its maillog and its sink."""
    _poll(lambda: instance.outcomes().sent >= expected, 5.0)  # postlogd may lag a little
    outcomes = instance.outcomes()
    sink = instance.sink.delivered()
    errors = []
    loss = max(expected - outcomes.sent_unique, 0)
    duplicates = outcomes.sent - outcomes.sent_unique
    if outcomes.sent_unique != expected:
        errors.append(f"maillog: {outcomes.sent_unique} recipients sent, expected {expected}")
    if duplicates:
        errors.append(f"maillog: {duplicates} recipients sent more than once")
    if outcomes.other:
        errors.append(f"maillog: other outcomes {outcomes.other}")
    if instance.in_flight():
        errors.append(f"{instance.in_flight()} queue files left in incoming/active/deferred")
    if sink < sink_min or (sink_exact is not None and sink != sink_exact):
        errors.append(f"sink counted {sink} transactions, expected "
                      f"{sink_exact if sink_exact is not None else f'>= {sink_min}'}")
    return loss, duplicates, errors, asdict(outcomes)


# --- the node side ---------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    """What drives a workload: ``send(port)`` submits it (blocking) and describes it."""

    name: str
    unit: str
    messages: int
    recipients: int
    send: Callable[[int], dict[str, Any]]
    probe: int = 0
    client: bool = False
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.probe and self.recipients != 1:
            raise ValueError("the probe sends one recipient per message: so must the load")

    @property
    def deliveries(self) -> int:
        """Recipients the relay must deliver (the probe's included)."""
        return self.messages * self.recipients + self.probe

    @property
    def units(self) -> int:
        return self.deliveries if self.unit == "delivery" else self.messages + self.probe


def _client_postfix(stack: contextlib.ExitStack, root: Path, relay_port: int,
                    enabled: bool) -> PostfixInstance | None:
    """The client Postfix of ``postfix-client`` relaying to ``relay_port`` (in ``root``,
    so CpuMeter counts it as ours; stopped with ``stack``), or None."""
    if not enabled:
        return None
    return stack.enter_context(start_postfix(
        CLIENT_PORT, sink_port=CLIENT_SINK_PORT, mode="relay", base_dir=root,
        main_cf={"relayhost": f"[127.0.0.1]:{relay_port}", "myhostname": CLIENT_HOSTNAME}))


def _client_check(client: PostfixInstance | None,
                  messages: int) -> tuple[list[str], dict[str, Any]]:
    """The client Postfix handed on every message exactly once (its maillog)."""
    if client is None:
        return [], {}
    _poll(lambda: client.in_flight() == 0 and client.outcomes().sent >= messages, 10.0)
    out = client.outcomes()
    errors = []
    if out.sent != messages or out.sent_unique != messages or out.other:
        errors.append(f"client Postfix sent {out.sent} ({out.sent_unique} distinct) of "
                      f"{messages}, other outcomes {out.other}")
    return errors, {"client_outcomes": asdict(out)}


def run_node_side(load: Load, processes: int) -> SideRun:
    """The workload through a fresh node to a fresh smtp-sink, checked by the store."""
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(workdir(None))
        sink: SmtpSink = stack.enter_context(start_smtp_sink(SINK_PORT, root))
        node, data_dir = stack.enter_context(running_node(
            processes, extra_config=delivery_config(SINK_PORT), base_dir=root))
        client = _client_postfix(stack, root, NODE_PORT, load.client)
        dsn = EmbeddedPostgres(data_dir / "postgres").dsn
        meter = CpuMeter(root)
        cpu = TreeCpu(lambda: node_pids(node.pid, data_dir))
        sink_cpu = TreeCpu(lambda: [sink.process.pid])
        client_cpu = TreeCpu(client.pids) if client is not None else None
        started, started_epoch = time.perf_counter(), time.time()
        with probing(NODE_PORT, load.probe, lambda: sink.delivered() > 0) as probe:
            sent = load.send(CLIENT_PORT if load.client else NODE_PORT)
            sink_done = sink.wait_for(load.messages + load.probe, load.timeout) - started
            asyncio.run(wait_until_final(dsn))
        seconds = cpu.stop()
        sink_seconds = sink_cpu.stop()
        client_seconds = client_cpu.stop() if client_cpu is not None else None
        # the probe's messages have one recipient, as have the loads that use it
        check, _ = asyncio.run(_store_check(dsn, load.messages + load.probe, load.recipients,
                                            sink, SETTLE_TIMEOUT_S))
        elapsed = max(sink_done, (check.last_delivered_at or 0.0) - started_epoch)
        client_errors, client_detail = _client_check(client, load.messages)
        other_cpu = meter.others_share()
        errors = check.errors + client_errors + ([f"probe: {probe.error}"] if probe.error else [])
        kept = None if not errors else _keep_evidence(node, data_dir, load.name)
        detail = {"send": sent, "check": asdict(check), "client_cpu_s": client_seconds,
                  **client_detail, "log_events": _log_events(data_dir),
                  "node_settings": _node_settings(data_dir), "evidence": kept}
        if load.probe:
            detail["probe"] = probe.summary(started + elapsed)
    loss, duplicates = node_loss_duplicates(asdict(check), load.deliveries)
    return SideRun(load.name, "mta", load.unit, load.units, elapsed, _rate(load.units, elapsed),
                   seconds, seconds / load.units, sink_seconds, check.sink_messages, loss,
                   duplicates, not errors, errors, other_cpu, detail)


# --- the Postfix side ------------------------------------------------------------------

def run_postfix_side(load: Load, main_cf: dict[str, str] | None = None,
                     master_cf: str = "", sink_exact: int | None = None) -> SideRun:
    """The workload through a fresh relaying Postfix to its smtp-sink, checked by its
    maillog, its queue and the sink."""
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(workdir(None))
        relay = stack.enter_context(start_postfix(
            POSTFIX_PORT, sink_port=POSTFIX_SINK_PORT, mode="relay", base_dir=root,
            main_cf=main_cf, master_cf=master_cf))
        client = _client_postfix(stack, root, POSTFIX_PORT, load.client)
        meter = CpuMeter(root)
        cpu = TreeCpu(relay.pids)
        sink_cpu = TreeCpu(lambda: [relay.sink.process.pid])
        client_cpu = TreeCpu(client.pids) if client is not None else None
        started = time.perf_counter()
        with probing(POSTFIX_PORT, load.probe, lambda: relay.sink.delivered() > 0) as probe:
            sent = load.send(CLIENT_PORT if load.client else POSTFIX_PORT)
            if load.unit == "delivery":  # transactions unknown: count the maillog's lines
                tail = _SentCounter(relay.root / "maillog")
                if not _poll(lambda: tail.count() >= load.deliveries, load.timeout):
                    raise TimeoutError(f"Postfix sent {tail.count()} of {load.deliveries}")
                done = time.perf_counter()
            else:
                done = relay.sink.wait_for(load.messages + load.probe, load.timeout)
        _poll(lambda: relay.in_flight() == 0, 10.0)  # qmgr still removes queue files
        seconds = cpu.stop()
        sink_seconds = sink_cpu.stop()
        client_seconds = client_cpu.stop() if client_cpu is not None else None
        loss, duplicates, errors, outcomes = postfix_check(
            relay, load.deliveries, load.messages + load.probe, sink_exact)
        client_errors, client_detail = _client_check(client, load.messages)
        errors += client_errors + ([f"probe: {probe.error}"] if probe.error else [])
        other_cpu = meter.others_share()
        elapsed = done - started
        detail = {"send": sent, "outcomes": outcomes, "client_cpu_s": client_seconds,
                  **client_detail, "main_cf": main_cf or {},
                  "master_cf": master_cf.splitlines()}
        if load.probe:
            detail["probe"] = probe.summary(done)
        transactions = relay.sink.delivered()
    return SideRun(load.name, "postfix", load.unit, load.units, elapsed,
                   _rate(load.units, elapsed), seconds, seconds / load.units, sink_seconds,
                   transactions, loss, duplicates, not errors, errors, other_cpu, detail)


class _SentCounter:
    """Counts ``status=sent`` lines in a growing maillog, reading only what is new."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._rest = b""
        self._count = 0

    def count(self) -> int:
        with contextlib.suppress(FileNotFoundError), self._path.open("rb") as f:
            f.seek(self._offset)
            data = self._rest + f.read()
            self._offset = f.tell()
            complete, _, self._rest = data.rpartition(b"\n")
            self._count += complete.count(b" status=sent ")
        return self._count


# --- the three workloads ---------------------------------------------------------------

def client_load(messages: int, probe: int) -> Load:
    """``postfix-client``: smtp-source -> client Postfix -> relay (node or Postfix)."""

    def send(port: int) -> dict[str, Any]:
        source = run_smtp_source("127.0.0.1", port, messages=messages, sessions=20,
                                 size=1024, recipients=1, timeout=max(120.0, messages / 20))
        return {"generator": "smtp-source", "command": source.command,
                "accept_rate": source.rate}

    return Load("postfix-client", "msg", messages, 1, send, probe=probe, client=True,
                timeout=max(120.0, messages / 20))


def newsletter_load(recipients: int) -> Load:
    """``newsletter``: one 100 KB message to ``recipients`` over 50 domains, submitted in
    messages of 1000 recipients."""
    content = newsletter_message()
    batches = max(recipients // NEWSLETTER_BATCH, 1)
    per_message = min(recipients, NEWSLETTER_BATCH)

    def send(port: int) -> dict[str, Any]:
        result = run_loadgen("127.0.0.1", port, messages=batches,
                             sessions=min(NEWSLETTER_SESSIONS, batches), size=0,
                             recipients=per_message, content=content,
                             domains=NEWSLETTER_DOMAINS, timeout=600.0)
        return {"generator": "loadgen", "message_bytes": len(content), **asdict(result)}

    return Load("newsletter", "delivery", batches, per_message, send,
                timeout=max(300.0, batches * per_message / 20))


def newsletter_postfix_config(mode: str) -> tuple[dict[str, str], str]:
    """main.cf and master.cf additions for the newsletter's Postfix.

    ``nexthop``: ``transport_maps = static:smtp:[127.0.0.1]:sink``; Postfix keys its
    queues by next hop, so this is one queue for every domain (as with relayhost) and it
    packs up to 50 recipients of any domains into one transaction. ``per-domain``: one
    smtp transport per domain (an inline transport map), so Postfix keeps a queue per
    domain as it would for 50 real MX hosts; each transport may run 2 processes (100 in
    all: default_process_limit, and the node's delivery.global_concurrency).
    """
    target = f"[127.0.0.1]:{POSTFIX_SINK_PORT}"
    if mode == "nexthop":
        return {"transport_maps": f"static:smtp:{target}"}, ""
    entries = ", ".join(f"d{i}.{RECIPIENT_DOMAIN}=blast{i}:{target}"
                        for i in range(NEWSLETTER_DOMAINS))
    master = "".join(f"blast{i}    unix  -       -       n       -       2       smtp\n"
                     for i in range(NEWSLETTER_DOMAINS))
    return {"transport_maps": f"inline:{{{entries}}}"}, master


def realistic_load(messages: int) -> Load:
    """``realistic-1m``: N 1 MiB MIME messages, 20 sessions, one recipient each."""
    content = realistic_message()

    def send(port: int) -> dict[str, Any]:
        result = run_loadgen("127.0.0.1", port, messages=messages,
                             sessions=REALISTIC_SESSIONS, size=0, recipients=1,
                             content=content, timeout=max(120.0, messages / 2))
        return {"generator": "loadgen", "message_bytes": len(content), **asdict(result)}

    return Load("realistic-1m", "msg", messages, 1, send, timeout=max(120.0, messages / 2))
