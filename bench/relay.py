"""Relay benchmark: mta-fleet end to end (smtp-source -> node -> smtp-sink) against Postfix.

For each workload (the same as ``bench.intake``) a fresh ``smtp-sink -c`` on 127.0.0.1
is the destination and a fresh node (``python -m mta serve``, embedded PostgreSQL in a
temp dir, intake's bench settings plus ``[delivery] enabled = true`` and one static route
``domain = "*"`` to the sink, ``tls = "none"``) takes N messages from Postfix's
``smtp-source``, with the same command line as ``bench.intake``. Measured: messages/s
from the source's start until the sink has counted N messages and the store has every
delivery recorded, p50/p99 accept-to-deliver latency per message (from the store:
``deliveries.finished_at`` of its last recipient minus ``messages.received_at``, both
PostgreSQL's clock), the node's peak RSS (VmHWM) and the most database connections it
held. Checked: the store holds N messages whose deliveries are all ``delivered``, each
with exactly one ``delivered`` event; the sink counted exactly the transactions the
store recorded, and at least N (more means messages were split over transactions, which
is reported); with ``--verify-recipients``, every recipient reached the sink exactly
once. Then a throwaway Postfix relays the same load to its own smtp-sink
(``bench.postfix_side.measure(workload, "relay")``) and the ratio of end-to-end rates
is reported.

``backlog`` preloads N queued 1 KiB deliveries into a fresh node's store (COPY, before
the node starts), starts the node with delivery pointed at a sink and reports its RSS
while it drains: it must not grow with N, since bodies are read only when sent (I4).

Run from the repository root, as root (Postfix needs it):

    python -m bench.relay                                 # all workloads, once each
    python -m bench.relay --workload 1k-x1 --repeat 3 --messages 2000
    python -m bench.relay --processes 1                   # default: one per core
    python -m bench.relay backlog --sizes 1000 10000 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg

import bench.intake as bench_intake
from bench.cpu import TreeCpu, descendants, node_pids
from bench.intake import (
    ADMIN_PORT,
    NODE_PORT,
    ConnectionSampler,
    process_tree,
    running_node,
    vm_hwm_kb,
)
from bench.loadgen import RECIPIENT_DOMAIN, SENDER, make_body, percentile
from bench.postfix_side import (
    SINK_USER,
    WORKLOADS,
    CpuMeter,
    Measurement,
    SmtpSink,
    Workload,
    measure,
    run_smtp_source,
    start_smtp_sink,
    wait_until_idle,
    workdir,
)
from mta.queue import EmbeddedPostgres, migrate_dsn, recipient_next_hop
from mta.queue.ids import new_message_id

SINK_PORT = 2610
POSTFIX_PORT = 2625
POSTFIX_SINK_PORT = 2626
#: After the sink has N messages: how long to wait for the store to record every outcome
#: while deliveries still progress, and how long with no progress before calling it a stall
#: (postponed deliveries come back after 5 s or more).
SETTLE_TIMEOUT_S = 360.0
STALL_S = 30.0
#: Extra seconds after the store is final before the sink count is read again (duplicates).
DUPLICATE_GRACE_S = 1.0


def delivery_config(sink_port: int) -> str:
    """The TOML added to intake's bench config: delivery on, everything to the sink."""
    return f"""
[delivery]
enabled = true
[[delivery.routes]]
domain = "*"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
"""


@dataclass(frozen=True)
class StoreCheck:
    """What the store and the sink say after a run: zero loss, zero duplicates.

    ``transactions`` is how many SMTP transactions the node recorded as delivered: the
    deliveries of one transaction share the time its dot went out (``last_dot_at``), so
    one (message, dot time) pair is one transaction (outcomes are written in batches, so
    the event time is no key: transactions of one message can share it). The sink must
    have counted exactly that many; ``split_messages`` were sent in more than one
    transaction (so the sink counts more than N messages).
    ``sink_recipients`` (with ``--verify-recipients``): RCPTs in the sink's dump, which
    must name every recipient exactly once.
    """

    messages: int
    states: dict[str, int]
    delivered_events: int
    possible_duplicates: int
    max_attempts: int
    transactions: int
    split_messages: int
    sink_messages: int
    sink_recipients: int | None
    #: Epoch seconds of the last recorded outcome (None unless every delivery is delivered).
    last_delivered_at: float | None
    #: Undelivered deliveries by state: count, seconds until due, last reply (diagnosis).
    pending: list[dict[str, Any]]
    errors: list[str]

    @property
    def ok(self) -> bool:
        """True when every loss and duplicate check passed."""
        return not self.errors


@dataclass(frozen=True)
class RelayRun:
    """One workload relayed by one fresh node to smtp-sink."""

    side: str
    workload: str
    messages: int
    recipients: int
    accept_rate: float
    done_seconds: float
    done_rate: float
    p50_ms: float
    p99_ms: float
    peak_rss_mb: float
    max_db_connections: int
    node_cores: float
    postgres_cores: float
    sink_cores: float
    other_cpu: float
    ok: bool
    check: dict[str, Any]
    log_events: dict[str, int]
    node_settings: dict[str, Any]
    command: list[str]
    profile: str | None = None
    metrics: dict[str, float] | None = None
    evidence: str | None = None
    #: CPU seconds (``bench.cpu``: whole process trees, reaped children included) from the
    #: source's start until every outcome is recorded (before the store check's queries):
    #: the node's processes, its embedded PostgreSQL's, and smtp-sink (apart: not the
    #: node's cost).
    node_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0
    sink_cpu_s: float = 0.0


@dataclass(frozen=True)
class BacklogRun:
    """A preloaded backlog drained by a fresh node: its memory while it drains."""

    side: str
    backlog: int
    preload_seconds: float
    drain_seconds: float
    drain_rate: float
    rss_ready_mb: float
    hwm_ready_mb: float
    rss_drain_max_mb: float
    peak_rss_mb: float
    rss_end_mb: float
    max_db_connections: int
    node_cores: float
    other_cpu: float
    ok: bool
    check: dict[str, Any]
    log_events: dict[str, int]
    node_settings: dict[str, Any]
    metrics: dict[str, float]
    evidence: str | None


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids``, including their reaped children."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(x) for x in stat[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _vm_rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """The most VmRSS a process had, sampled every 100 ms in a thread of its own."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.maximum_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.maximum_kb = max(self.maximum_kb, _vm_rss_kb(self._pid))
            self._stop.wait(0.1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class CpuClock:
    """CPU seconds used by a changing set of processes since creation."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._start = _cpu_seconds(pids())

    def used(self) -> float:
        """CPU seconds since creation (processes that exited meanwhile are not counted)."""
        return max(_cpu_seconds(self._pids()) - self._start, 0.0)


def _postgres_pids(data_dir: Path) -> list[int]:
    pid = EmbeddedPostgres(data_dir / "postgres").postmaster_pid()
    return process_tree(pid) if pid else []


def _node_settings(data_dir: Path) -> dict[str, Any]:
    """The node's TOML as run (paths left out): the exact non-default settings."""
    settings = tomllib.loads((data_dir.parent / "node.toml").read_text())
    settings.get("node", {}).pop("data_dir", None)
    return settings


def _log_events(data_dir: Path) -> dict[str, int]:
    """Warnings and errors in the node's log (it logs at warning), by level and event."""
    counts: Counter[str] = Counter()
    path = data_dir.parent / "node.log"
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            counts["non-json line"] += 1
            continue
        counts[f"{entry.get('level', '?')}:{entry.get('event', '?')}"] += 1
    return dict(counts)


async def _wait_final(conn: asyncpg.Connection, timeout: float) -> int:
    """Wait until no delivery is queued or leased, while they progress (STALL_S); return
    how many still are."""
    deadline = time.monotonic() + timeout
    last, progressed = -1, time.monotonic()
    while True:
        pending = int(await conn.fetchval(
            "SELECT count(*) FROM deliveries WHERE state IN ('queued', 'leased')"))
        now = time.monotonic()
        if pending != last:
            last, progressed = pending, now
        if pending == 0 or now > deadline or now - progressed > STALL_S:
            return pending
        await asyncio.sleep(0.2)


async def wait_until_final(dsn: str, timeout: float = SETTLE_TIMEOUT_S) -> int:
    """Wait until the node has recorded every delivery's outcome (or stalled, STALL_S, or
    ``timeout``); return how many deliveries are still queued or leased."""
    conn = await asyncpg.connect(dsn)
    try:
        return await _wait_final(conn, timeout)
    finally:
        await conn.close()


async def _store_check(dsn: str, messages: int, recipients: int, sink: SmtpSink,
                       timeout: float, dump: Path | None = None
                       ) -> tuple[StoreCheck, list[float]]:
    """Wait until every delivery is final, then check counts; also each message's latency."""
    conn = await asyncpg.connect(dsn)
    try:
        await _wait_final(conn, timeout)
        await asyncio.sleep(DUPLICATE_GRACE_S)
        last_delivered = await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at))::float8 FROM deliveries "
            "HAVING bool_and(state = 'delivered')")
        pending_rows = [dict(r) for r in await conn.fetch(
            "SELECT state, count(*) AS n, "
            "round(extract(epoch FROM min(next_attempt_at - now()))::numeric, 1)::float8 "
            "AS due_in_min_s, "
            "round(extract(epoch FROM max(next_attempt_at - now()))::numeric, 1)::float8 "
            "AS due_in_max_s, max(attempts) AS max_attempts, min(last_reply) AS a_reply "
            "FROM deliveries WHERE state <> 'delivered' GROUP BY state")]
        states = {r["state"]: r["n"] for r in await conn.fetch(
            "SELECT state, count(*) AS n FROM deliveries GROUP BY state")}
        stored = await conn.fetchval("SELECT count(*) FROM messages")
        events = await conn.fetchval(
            "SELECT count(*) FROM delivery_events WHERE state = 'delivered'")
        duplicates = await conn.fetchval(
            "SELECT count(*) FROM deliveries WHERE possible_duplicate")
        attempts = await conn.fetchval("SELECT coalesce(max(attempts), 0) FROM deliveries")
        groups = await conn.fetchrow(
            "SELECT coalesce(sum(n), 0)::bigint AS transactions, "
            "count(*) FILTER (WHERE n > 1) AS split "
            "FROM (SELECT message_id, count(DISTINCT coalesce(last_dot_at, finished_at)) "
            "AS n FROM deliveries WHERE state = 'delivered' GROUP BY message_id) AS t")
        assert groups is not None
        rows = await conn.fetch(
            "SELECT extract(epoch FROM max(d.finished_at) - m.received_at)::float8 AS s "
            "FROM messages m JOIN deliveries d ON d.message_id = m.id "
            "GROUP BY m.id, m.received_at")
    finally:
        await conn.close()
    received = sink.delivered()
    errors = []
    if received != groups["transactions"]:
        errors.append(f"sink counted {received} messages, the node recorded "
                      f"{groups['transactions']} transactions ({messages} messages)")
    if received < messages:
        errors.append(f"sink counted {received} messages, fewer than {messages}")
    rcpts = _dumped_recipients(dump) if dump is not None else None
    if rcpts is not None and (len(rcpts) != messages * recipients
                              or set(rcpts.values()) != {1}):
        errors.append(f"sink got {len(rcpts)} distinct recipients, {sum(rcpts.values())} in "
                      f"all, expected {messages * recipients} once each")
    if stored != messages:
        errors.append(f"store holds {stored} messages, expected {messages}")
    if states != {"delivered": messages * recipients}:
        errors.append(f"delivery states {states}, expected all {messages * recipients} "
                      "delivered")
    if events != messages * recipients:
        errors.append(f"{events} 'delivered' events, expected {messages * recipients}")
    if duplicates:
        errors.append(f"{duplicates} deliveries marked possible_duplicate")
    latencies = sorted(r["s"] for r in rows if r["s"] is not None)
    check = StoreCheck(stored, states, events, duplicates, attempts, groups["transactions"],
                       groups["split"], received,
                       sum(rcpts.values()) if rcpts is not None else None, last_delivered,
                       pending_rows, errors)
    return check, latencies


def _dumped_recipients(dump: Path) -> Counter[str]:
    """How often each recipient appears in smtp-sink's ``-D`` dump (X-Rcpt-Args lines)."""
    counts: Counter[str] = Counter()
    with dump.open("rb") as f:
        for line in f:
            if line.startswith(b"X-Rcpt-Args: "):
                counts[line[13:].strip().decode(errors="replace").lower()] += 1
    return counts


@contextlib.contextmanager
def _sink(root: Path, verify_recipients: bool) -> Iterator[tuple[SmtpSink, Path | None]]:
    """smtp-sink on SINK_PORT; with ``verify_recipients`` it also dumps every transaction."""
    dump = None
    args: list[str] = []
    if verify_recipients:
        (root / "dump").mkdir()
        shutil.chown(root / "dump", SINK_USER)
        dump = root / "dump" / "sink.dump"
        args = ["-D", str(dump)]
    with start_smtp_sink(SINK_PORT, root, extra_args=args) as sink:
        yield sink, dump


@contextlib.contextmanager
def _py_spy(pid: int, output: Path | None, seconds: float) -> Iterator[None]:
    """Profile ``pid`` and its processes with py-spy (raw collapsed stacks) for ``seconds``
    during the block."""
    if output is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
           "--rate", "100", "--format", "raw", "--output", str(output), "--nonblocking",
           "--subprocesses"]
    profiler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            profiler.wait(timeout=seconds + 15)
        except subprocess.TimeoutExpired:
            profiler.send_signal(signal.SIGINT)
            try:
                profiler.wait(timeout=10)
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait()


def run_mta(workload: Workload, *, processes: int = 1, profile: Path | None = None,
            profile_seconds: float = 20.0, verify_recipients: bool = False) -> RelayRun:
    """Relay one workload through a fresh node to a fresh smtp-sink, and check it."""
    w = workload
    timeout = max(120.0, w.messages / 20)
    with workdir(None) as root, _sink(root, verify_recipients) as (sink, dump), \
            running_node(processes, extra_config=delivery_config(SINK_PORT), base_dir=root) \
            as (node, data_dir):
        dsn = EmbeddedPostgres(data_dir / "postgres").dsn
        node_cpu = CpuClock(lambda: process_tree(node.pid))
        pg_cpu = CpuClock(lambda: _postgres_pids(data_dir))
        sink_cpu = CpuClock(lambda: [sink.process.pid])
        trees = (TreeCpu(lambda: descendants(node.pid)),
                 TreeCpu(lambda: node_pids(node.pid, data_dir)),
                 TreeCpu(lambda: [sink.process.pid]))
        meter = CpuMeter(root)
        with ConnectionSampler(dsn) as sampler, _py_spy(node.pid, profile, profile_seconds):
            started, started_epoch = time.perf_counter(), time.time()
            source = run_smtp_source("127.0.0.1", NODE_PORT, messages=w.messages,
                                     sessions=w.sessions, size=w.size, recipients=w.recipients,
                                     timeout=timeout)
            sink_done = sink.wait_for(w.messages, timeout) - started
            asyncio.run(wait_until_final(dsn))  # so the CPU counted is the run's, no more
            node_s, both_s, sink_s = (tree.stop() for tree in trees)
            check, latencies = asyncio.run(_store_check(dsn, w.messages, w.recipients, sink,
                                                        SETTLE_TIMEOUT_S, dump))
            # Done when the sink has N messages and the store has every delivery recorded
            # (a message split over transactions can bring the sink to N before that).
            elapsed = max(sink_done, (check.last_delivered_at or 0.0) - started_epoch)
            cores = (node_cpu.used() / elapsed, pg_cpu.used() / elapsed,
                     sink_cpu.used() / elapsed)
            other_cpu = meter.others_share()
            peak_kb = max(vm_hwm_kb(pid) for pid in process_tree(node.pid))
            metrics = _delivery_metrics(processes)
            kept = None if check.ok else _keep_evidence(node, data_dir, w.name)
        events = _log_events(data_dir)
        settings = _node_settings(data_dir)
    return RelayRun(
        side="mta", workload=w.name, messages=w.messages, recipients=w.recipients,
        accept_rate=source.rate, done_seconds=elapsed, done_rate=w.messages / elapsed,
        p50_ms=percentile(latencies, 0.5) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
        peak_rss_mb=peak_kb / 1024, max_db_connections=sampler.maximum, node_cores=cores[0],
        postgres_cores=cores[1], sink_cores=cores[2], other_cpu=other_cpu, ok=check.ok,
        check=asdict(check), log_events=events, node_settings=settings,
        command=source.command, profile=str(profile) if profile else None,
        metrics=metrics, evidence=kept, node_cpu_s=node_s,
        postgres_cpu_s=max(both_s - node_s, 0.0), sink_cpu_s=sink_s,
    )


def _delivery_metrics(processes: int = 1) -> dict[str, float]:
    """The node's ``mta_delivery_*`` counters, summed over labels and over its processes
    (each serves /metrics on the admin port plus its index)."""
    totals: dict[str, float] = {}
    for index in range(processes):
        with contextlib.suppress(OSError):
            url = f"http://127.0.0.1:{ADMIN_PORT + index}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                for line in reply.read().decode().splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name.startswith("mta_delivery_") and name.endswith("_total"):
                        totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def _keep_evidence(node: subprocess.Popen[bytes], data_dir: Path, name: str) -> str:
    """After a failed check: the node's task stacks (SIGUSR1) and log, kept for diagnosis."""
    node.send_signal(signal.SIGUSR1)
    time.sleep(2)
    keep = Path(tempfile.mkdtemp(prefix=f"relay-failed-{name}-"))
    shutil.copy(data_dir.parent / "node.log", keep / "node.log")
    shutil.copytree(data_dir / "journal", keep / "journal", dirs_exist_ok=True)
    return str(keep)


def _backlog_records(n: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """N one-recipient messages of about 1 KiB (headers + body) and their deliveries."""
    messages, deliveries = [], []
    for i in range(n):
        message_id: uuid.UUID = new_message_id()
        header = (f"From: {SENDER}\r\nTo: r{i}@{RECIPIENT_DOMAIN}\r\n"
                  f"Subject: backlog {i}\r\nMessage-ID: <b{i}@bench.example>\r\n\r\n").encode()
        body = header + make_body(1024 - len(header))
        messages.append((message_id, SENDER, len(body), b"", body, "127.0.0.1", "bench",
                         None, f"<b{i}@bench.example>"))
        recipient = f"r{i}@{RECIPIENT_DOMAIN}"
        deliveries.append((message_id, recipient, recipient_next_hop(recipient)))
    return messages, deliveries


async def _copy_backlog(dsn: str, n: int) -> None:
    await migrate_dsn(dsn)
    messages, deliveries = _backlog_records(n)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "messages", records=messages,
            columns=["id", "mail_from", "size_bytes", "trace_headers", "body", "client_address",
                     "helo_name", "auth_user", "message_id_header"])
        await conn.copy_records_to_table(
            "deliveries", records=deliveries, columns=["message_id", "recipient", "next_hop"])
        await conn.execute("VACUUM ANALYZE messages")
        await conn.execute("VACUUM ANALYZE deliveries")
    finally:
        await conn.close()


def preload_backlog(data_dir: Path, n: int) -> None:
    """Put ``n`` queued deliveries into the node's embedded store before it starts."""
    server = EmbeddedPostgres(data_dir / "postgres")
    try:
        asyncio.run(_copy_backlog(server.start(), n))
    finally:
        server.stop()


def run_backlog(n: int) -> BacklogRun:
    """Preload ``n`` deliveries, start a node with delivery to a sink, watch it drain."""
    timeout = max(120.0, n / 50)
    preload_s: list[float] = []

    def prepare(data_dir: Path) -> None:
        started = time.perf_counter()
        preload_backlog(data_dir, n)
        preload_s.append(time.perf_counter() - started)

    with workdir(None) as root, start_smtp_sink(SINK_PORT, root) as sink, \
            running_node(1, extra_config=delivery_config(SINK_PORT), base_dir=root,
                         prepare=prepare) as (node, data_dir):
        ready = time.perf_counter()
        rss_ready, hwm_ready = _vm_rss_kb(node.pid), vm_hwm_kb(node.pid)
        node_cpu = CpuClock(lambda: process_tree(node.pid))
        meter = CpuMeter(root)
        dsn = EmbeddedPostgres(data_dir / "postgres").dsn
        with ConnectionSampler(dsn) as sampler, RssSampler(node.pid) as rss:
            done = sink.wait_for(n, timeout)
            other_cpu = meter.others_share()
            cores = node_cpu.used() / (done - ready)
            check, _ = asyncio.run(_store_check(dsn, n, 1, sink, SETTLE_TIMEOUT_S))
            drain = asyncio.run(_drain_seconds(dsn))
            peak_kb = max(vm_hwm_kb(pid) for pid in process_tree(node.pid))
            rss_end = _vm_rss_kb(node.pid)
            metrics = _delivery_metrics()
            kept = None if check.ok else _keep_evidence(node, data_dir, f"backlog-{n}")
        events = _log_events(data_dir)
        settings = _node_settings(data_dir)
    return BacklogRun(
        side="mta", backlog=n, preload_seconds=preload_s[0], drain_seconds=drain,
        drain_rate=n / drain, rss_ready_mb=rss_ready / 1024, hwm_ready_mb=hwm_ready / 1024,
        rss_drain_max_mb=rss.maximum_kb / 1024, peak_rss_mb=peak_kb / 1024,
        rss_end_mb=rss_end / 1024, max_db_connections=sampler.maximum, node_cores=cores,
        other_cpu=other_cpu, ok=check.ok, check=asdict(check), log_events=events,
        node_settings=settings, metrics=metrics, evidence=kept,
    )


async def _drain_seconds(dsn: str) -> float:
    """Seconds from the first recorded outcome to the last (the store's clock)."""
    conn = await asyncpg.connect(dsn)
    try:
        return float(await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at) - min(e.at)) FROM deliveries "
            "CROSS JOIN (SELECT min(at) AS at FROM delivery_events) AS e"))
    finally:
        await conn.close()


def code_version() -> dict[str, Any]:
    """The commit measured and any uncommitted changes under mta/ (read-only git calls)."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], capture_output=True, text=True, check=False)
        return done.stdout.rstrip()

    dirty = git("status", "--porcelain", "--", "mta")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "mta_uncommitted": [line[3:] for line in dirty.splitlines()],
            "mta_diff_sha1": hashlib.sha1(git("diff", "HEAD", "--", "mta").encode()).hexdigest()
            if dirty else None}


def _attempts(run: Callable[[], Any], args: argparse.Namespace) -> list[tuple[Any, bool]]:
    """Run until other programs used at most ``--max-other-cpu``; return every attempt."""
    results = []
    for _ in range(args.attempts):
        idle = wait_until_idle(args.min_idle, args.idle_timeout)
        code = code_version()
        result = run()
        clean = result.other_cpu <= args.max_other_cpu
        results.append((result, clean))
        changed = {"code_changed_during_run": code_version()} if code_version() != code else {}
        print(json.dumps({**asdict(result), "idle_before": round(idle, 3), "clean": clean,
                          "code": code, **changed}), flush=True)
        if clean:
            break
    return results


def _relay(args: argparse.Namespace) -> int:
    chosen = [w for w in WORKLOADS if not args.workload or w.name in args.workload]
    if args.messages:
        chosen = [replace(w, messages=args.messages) for w in chosen]
    rows = []
    failed = False
    for workload in chosen:
        mta_runs: list[tuple[RelayRun, bool]] = []
        postfix_runs: list[tuple[Any, bool]] = []
        for _ in range(args.repeat):
            profile = args.py_spy if workload.name == args.py_spy_workload else None
            mta_runs += _attempts(partial(run_mta, workload, processes=args.processes,
                                          profile=profile,
                                          profile_seconds=args.py_spy_seconds,
                                          verify_recipients=args.verify_recipients), args)
            if not args.no_postfix:
                postfix_runs += _attempts(partial(_postfix_relay, workload), args)
        failed |= any(not run.ok for run, _ in mta_runs)
        rows.append((workload, _best(mta_runs), _best(postfix_runs),
                     sum(not run.ok for run, _ in mta_runs), len(mta_runs)))
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, {platform.platform()}; "
          f"generator: smtp-source; node processes: {args.split or args.processes}; "
          f"repeat: {args.repeat} "
          f"(medians of the clean runs that passed their checks, else of those that passed); "
          f"code: {code_version()}\n")
    print("| workload | messages | mta e2e msg/s | mta accept msg/s | Postfix e2e msg/s | ratio "
          "| p50 ms | p99 ms | peak RSS MB | DB conns | node cores | pg cores | other_cpu "
          "| checks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload, runs, pf_runs, failures, attempts in rows:
        rate = statistics.median(r.done_rate for r in runs)
        postfix = statistics.median(r.done_rate for r in pf_runs) if pf_runs else None
        ratio = f"{rate / postfix:.2f}x" if postfix else "n/a"
        other = max(r.other_cpu for r in [*runs, *pf_runs])
        print(f"| {workload.name} | {workload.messages} | {rate:.0f} | "
              f"{statistics.median(r.accept_rate for r in runs):.0f} | "
              f"{f'{postfix:.0f}' if postfix else 'n/a'} | {ratio} | "
              f"{statistics.median(r.p50_ms for r in runs):.1f} | "
              f"{statistics.median(r.p99_ms for r in runs):.1f} | "
              f"{max(r.peak_rss_mb for r in runs):.0f} | "
              f"{max(r.max_db_connections for r in runs)} | "
              f"{statistics.median(r.node_cores for r in runs):.2f} | "
              f"{statistics.median(r.postgres_cores for r in runs):.2f} | {other:.3f} | "
              f"{_verdict(runs, failures, attempts)} |")
    return 1 if failed else 0


@dataclass(frozen=True)
class _PostfixRun:
    """A Postfix relay measurement with the fields the table reads."""

    side: str
    done_rate: float
    other_cpu: float
    measurement: dict[str, Any]

    @classmethod
    def of(cls, m: Measurement) -> _PostfixRun:
        """Wrap one ``measure`` result."""
        return cls("postfix", m.done_rate, m.other_cpu, asdict(m))


def _verdict(runs: list[RelayRun], failures: int, attempts: int) -> str:
    """'ok', 'ok, K split' (messages sent in several transactions), or which runs FAILED."""
    if not all(r.ok for r in runs):
        return "FAILED"
    split = max(r.check["split_messages"] for r in runs)
    verdict = f"ok, {split} split" if split else "ok"
    return f"{verdict}; {failures} of {attempts} runs FAILED" if failures else verdict


def _postfix_relay(workload: Workload) -> _PostfixRun:
    """Postfix relaying the same load to its own smtp-sink (a fresh instance)."""
    return _PostfixRun.of(measure(workload, "relay", port=POSTFIX_PORT,
                                  sink_port=POSTFIX_SINK_PORT))


def _best(runs: list[tuple[Any, bool]]) -> list[Any]:
    """Runs for the medians: clean ones that passed their checks, else those that passed,
    else all (a Postfix run has no checks of ours: ``measure`` raises when one fails)."""
    passed = [(run, clean) for run, clean in runs if getattr(run, "ok", True)]
    clean = [run for run, ok in passed if ok]
    return clean or [run for run, _ in passed] or [run for run, _ in runs]


def _backlog(args: argparse.Namespace) -> int:
    runs = []
    for size in args.sizes:
        runs += [r for r, _ in _attempts(partial(run_backlog, size), args)][-1:]
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, {platform.platform()}; "
          f"code: {code_version()}\n")
    print("| queued deliveries | preload s | drain s | drain msg/s | RSS ready MB "
          "| max RSS draining MB | peak RSS (VmHWM) MB | RSS end MB | DB conns | node cores "
          "| other_cpu | checks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r.backlog:,} | {r.preload_seconds:.1f} | {r.drain_seconds:.1f} | "
              f"{r.drain_rate:.0f} | {r.rss_ready_mb:.0f} | {r.rss_drain_max_mb:.0f} | "
              f"{r.peak_rss_mb:.0f} | "
              f"{r.rss_end_mb:.0f} | {r.max_db_connections} | {r.node_cores:.2f} | "
              f"{r.other_cpu:.3f} | {'ok' if r.ok else 'FAILED'} |")
    return 0 if all(r.ok for r in runs) else 1


def main(argv: list[str] | None = None) -> None:
    """CLI: relay workloads against Postfix (default), or ``backlog`` RSS against backlog."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--min-idle", type=float, default=0.9, help="CPU idle share to wait for")
    common.add_argument("--idle-timeout", type=float, default=300.0, help="max wait per run, s")
    common.add_argument("--max-other-cpu", type=float, default=0.05,
                        help="rerun a run if other programs used more of the machine")
    common.add_argument("--attempts", type=int, default=2, help="max tries per run")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS])
    parser.add_argument("--messages", type=int, help="override each workload's message count")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; medians reported")
    parser.add_argument("--no-postfix", action="store_true", help="skip the Postfix side")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="node processes (default: one per core, as an operator sizes "
                             "node.processes)")
    bench_intake.add_split_argument(parser)
    parser.add_argument("--verify-recipients", action="store_true",
                        help="smtp-sink -D dump: check every recipient arrived exactly once")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="profile the node with py-spy (raw stacks to FILE)")
    parser.add_argument("--py-spy-workload", default="1k-x1", help="the workload to profile")
    parser.add_argument("--py-spy-seconds", type=float, default=20.0)
    sub = parser.add_subparsers(dest="command")
    backlog = sub.add_parser("backlog", parents=[common],
                             help="node peak RSS while draining a preloaded backlog")
    backlog.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    args = parser.parse_args(argv)
    bench_intake.apply_split(parser, args)
    if os.geteuid() != 0:
        parser.error("run as root (the Postfix side and smtp-sink -u need it)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # so teardown runs on kill
    sys.exit(_backlog(args) if args.command == "backlog" else _relay(args))


if __name__ == "__main__":
    main()
