"""Reroute N pending deliveries off an isolated node to two active ones (issue 10).

One embedded PostgreSQL (in a temp dir) holds three migrated databases, one per node:
``a`` gets N one-recipient messages of about ``--size`` bytes by COPY (half ``queued``,
half ``deferred`` with attempts and a retry in the future) and is set ``isolated``; ``b``
and ``c`` are real nodes (``python -m mta serve``, delivery off, admin token) that must
answer 200 on ``/readyz``. Then ``mta fleet reroute a --to b --to c --json`` runs as a
subprocess, timed, with its peak RSS (``os.wait4`` on its pid, and its own VmHWM sampled
every 10 ms), and the stores are checked: every delivery of ``a`` is ``rerouted`` to a
copy that exists on the target it names, ``b`` and ``c`` together hold each of them
exactly once, queued, with the same envelope, body, recipient and attempts.

Before each run it waits for the machine to be idle; a run during which other programs
used more than ``--max-other-cpu`` of it is not clean and is repeated (``--attempts``).
Loading and checking run in child processes, so this process stays smaller than the
command (a child's ru_maxrss starts at its parent's RSS). Exit status 1 if a check failed.

    python -m bench.reroute                                   # 7,000 and 70,000
    python -m bench.reroute --deliveries 70000 --batch 2000
    python -m bench.reroute --deliveries 70000 --breakdown    # wall time per store call
    python -m bench.reroute --deliveries 70000 --fleet-database   # no embedded audit store
    python -m bench.reroute --deliveries 70000 --profile /tmp/reroute.prof   # cProfile
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench.postfix_side import CpuMeter, wait_until_idle
from mta.queue import EmbeddedPostgres, migrate_dsn
from mta.queue.ids import new_message_id

TOKEN = "bench-reroute-token"
REPO = Path(__file__).resolve().parent.parent
TARGETS = ("b", "c")
#: Seconds a node may take to answer 200 on /readyz.
START_TIMEOUT_S = 60.0
#: Seconds the reroute command may take before the run is abandoned.
REROUTE_TIMEOUT_S = 900.0
#: Seconds a node has to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT_S = 15.0
#: Seconds to wait for the machine to be idle before a run.
IDLE_TIMEOUT_S = 300.0
DOMAINS = [f"mail{n}.example" for n in range(40)] + ["gmail.example", "outlook.example"]
WORDS = ["the", "quarterly", "newsletter", "issue", "subscribers", "archive", "update",
         "weekly", "digest", "notes", "thanks", "reading", "reply", "unsubscribe", "link",
         "preferences", "post", "author", "community", "event", "summary", "release",
         "changes", "details", "schedule"]


@dataclass
class RunResult:
    """One reroute run and what the stores say afterwards."""

    deliveries: int
    batch: int
    size: int
    seconds: float
    rate: float
    peak_rss_mib: float
    vm_hwm_mib: float
    exit_code: int
    duplicates: int
    lost: int
    mismatched: int
    split: dict[str, int]
    source_rerouted: int
    source_pending: int
    #: Seconds from the command's start to its first and last receipt (store clock),
    #: and from the last receipt to the audit line and to the exit.
    phases: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    #: ``--breakdown``: wall seconds and calls of reroute's store calls in the command.
    breakdown: dict[str, Any] = field(default_factory=dict)
    #: CPU seconds during the command: the CLI (with the children it reaped), the
    #: PostgreSQL server (all three stores), each target node.
    cpu: dict[str, float] = field(default_factory=dict)
    #: Share of the machine's CPU others used during the run, and idle before it.
    other_cpu: float = 0.0
    idle_before: float = 0.0
    fleet_database: bool = False
    #: The commit measured, and files under mta/ that differ from it.
    commit: str = ""
    uncommitted: list[str] = field(default_factory=list)
    #: The command's "audited: …" line (where the fleet record went).
    audit: str = ""
    command: str = ""

    def clean(self, max_other_cpu: float) -> bool:
        """Whether others left the machine to us during the run."""
        return self.other_cpu <= max_other_cpu

    @property
    def ok(self) -> bool:
        return (self.exit_code == 0 and self.duplicates == 0 and self.lost == 0
                and self.mismatched == 0 and self.source_pending == 0)


def _code() -> tuple[str, list[str]]:
    """HEAD's short hash and the files under mta/ that differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30, check=False).stdout
    changed = git("status", "--porcelain", "--", "mta").splitlines()
    return git("rev-parse", "--short", "HEAD").strip(), sorted(line[3:] for line in changed)


def _free_port(avoid: set[int]) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            avoid.add(port)
            return port
    raise RuntimeError("no free loopback port")


def _body(n: int, size: int, rng: random.Random, recipient: str) -> bytes:
    """A newsletter-like message of about ``size`` bytes (headers and text lines)."""
    head = (f"From: Author {n % 97} <author{n % 97}@news.example>\r\n"
            f"To: <{recipient}>\r\n"
            f"Subject: Issue {n}: {' '.join(rng.choices(WORDS, k=5))}\r\n"
            f"Date: Tue, 01 Dec 2026 10:{n % 60:02d}:00 +0000\r\n"
            f"Message-ID: <{n}.{rng.getrandbits(48):x}@news.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "List-Unsubscribe: <https://news.example/u>\r\n\r\n")
    lines = [head]
    length = len(head)
    while length < size:
        line = " ".join(rng.choices(WORDS, k=11)) + "\r\n"
        lines.append(line)
        length += len(line)
    return "".join(lines).encode()[:max(size, len(head))]


def _rows(count: int, size: int) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """(message row, delivery row) pairs: even n queued and due, odd n deferred."""
    rng = random.Random(10)
    now = datetime.now(UTC)
    for n in range(count):
        message_id = new_message_id()
        recipient = f"reader{n}@{DOMAINS[n % len(DOMAINS)]}"
        trace = (f"Received: from app{n % 7}.news.example (app{n % 7}.news.example "
                 f"[10.0.{n % 7}.5])\r\n\tby a.mta.example with ESMTP id {message_id.hex[:12]};"
                 f" Tue, 1 Dec 2026 10:00:00 +0000\r\n").encode()
        body = _body(n, size, rng, recipient)
        received = now - timedelta(seconds=count - n)
        message = (message_id, f"bounce+{n}@news.example", len(trace) + len(body), trace, body,
                   "10.0.0.5", "app.news.example", None, f"<{n}@news.example>", received)
        delivery: tuple[Any, ...]
        if n % 2:
            attempts = 1 + n % 5
            delivery = (message_id, recipient, recipient.rpartition("@")[2], "deferred",
                        attempts, now + timedelta(minutes=10 + n % 120), 451,
                        "451 4.7.1 Try again later", now - timedelta(minutes=1))
        else:
            delivery = (message_id, recipient, recipient.rpartition("@")[2], "queued", 0,
                        received, None, None, None)
        yield message, delivery


async def _create_database(server: EmbeddedPostgres, name: str) -> None:
    admin = await asyncpg.connect(server.dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()


async def _prepare(server: EmbeddedPostgres, count: int, size: int) -> None:
    """Databases a, b, c, migrated; ``count`` pending deliveries in a; a isolated."""
    for name in ("a", *TARGETS):
        await _create_database(server, name)
        await migrate_dsn(server.dsn_for(name))
    conn = await asyncpg.connect(server.dsn_for("a"))
    try:
        chunk = 10_000
        rows = _rows(count, size)
        for _ in range(0, count, chunk):
            pairs = [pair for _, pair in zip(range(chunk), rows, strict=False)]
            await conn.copy_records_to_table(
                "messages", records=[m for m, _ in pairs],
                columns=["id", "mail_from", "size_bytes", "trace_headers", "body",
                         "client_address", "helo_name", "auth_user", "message_id_header",
                         "received_at"])
            await conn.copy_records_to_table(
                "deliveries", records=[d for _, d in pairs],
                columns=["message_id", "recipient", "next_hop", "state", "attempts",
                         "next_attempt_at", "last_reply_code", "last_reply",
                         "last_attempt_at"])
        await conn.execute(
            "INSERT INTO node_mode (node, mode, reason, changed_by) "
            "VALUES ('a', 'isolated', 'bench: store unhealthy', 'bench')")
        await conn.execute("VACUUM ANALYZE messages")
        await conn.execute("VACUUM ANALYZE deliveries")
    finally:
        await conn.close()


def _node_config(work: Path, name: str, dsn: str, ports: set[int]) -> tuple[Path, int, int]:
    smtp, admin = _free_port(ports), _free_port(ports)
    (work / name / "data").mkdir(parents=True)
    config = work / name / "node.toml"
    config.write_text(
        f'[node]\nname = "{name}"\ndata_dir = "{work / name / "data"}"\n'
        f"workers = 2\nintake_db_slots = 2\n"
        f"[database]\ndsn = {json.dumps(dsn)}\n"
        f'[smtp]\nlisten = "127.0.0.1:{smtp}"\nhostname = "{name}.mta.example"\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\ntoken = "{TOKEN}"\n'
        "[admission]\nmin_free_disk = 0\n"
        '[log]\nformat = "json"\n'
        "[delivery]\nenabled = false\n", encoding="utf-8")
    return config, smtp, admin


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _stat(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants, reaped children's included
    (a server's exited backends are in the postmaster's cutime)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))):
            parents[int(entry)] = stat
    tree = {root}
    for _ in range(len(parents)):
        grown = {pid for pid, stat in parents.items() if int(stat[1]) in tree} - tree
        if not grown:
            break
        tree |= grown
    ticks = sum(sum(int(x) for x in parents[pid][11:15]) for pid in tree if pid in parents)
    return ticks / os.sysconf("SC_CLK_TCK")


def _run_cli(argv: list[str], cwd: Path,
             env: dict[str, str] | None = None) -> tuple[int, float, int, int, float, float, str,
                                 list[tuple[float, str]]]:
    """Run ``argv``; (exit code, seconds, ru_maxrss KiB, the last VmHWM KiB sampled and
    when it last rose, CPU seconds, stdout, stderr lines with their seconds since start)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[bytes] = []
    err: list[tuple[float, str]] = []

    def read_out() -> None:
        assert process.stdout is not None
        out.append(process.stdout.read())

    def read_err() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            err.append((time.monotonic() - started, line.decode(errors="replace").rstrip()))

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for reader in readers:
        reader.start()
    hwm = 0
    hwm_at = 0.0
    try:
        deadline = started + REROUTE_TIMEOUT_S
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            sampled = _vm_hwm_kib(process.pid)
            if sampled > hwm:
                hwm, hwm_at = sampled, time.monotonic() - started
            if time.monotonic() > deadline:
                raise RuntimeError(f"reroute did not finish in {REROUTE_TIMEOUT_S} s")
            time.sleep(0.01)
    except BaseException:
        process.kill()
        os.waitpid(process.pid, 0)
        process.returncode = -9
        raise
    elapsed = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join(10)
    cpu = usage.ru_utime + usage.ru_stime
    return (process.returncode, elapsed, usage.ru_maxrss, hwm, hwm_at, cpu,
            b"".join(out).decode(errors="replace"), err)


async def _verify(server: EmbeddedPostgres, count: int) -> dict[str, Any]:
    """Compare a's deliveries with the copies on b and c."""
    digest = "md5(m.trace_headers || m.body || m.mail_from)"
    conns = {name: await asyncpg.connect(server.dsn_for(name)) for name in ("a", *TARGETS)}
    try:
        a = conns["a"]
        by_state: dict[str, int] = {row["state"]: int(row["count"]) for row in await a.fetch(
            "SELECT state, count(*) FROM deliveries GROUP BY state")}
        source = {row["id"]: row for row in await a.fetch(
            f"SELECT d.id, d.recipient, d.attempts, d.reroute_target, d.rerouted_to_message, "
            f"{digest} AS digest FROM deliveries AS d JOIN messages AS m ON m.id = d.message_id")}
        copies: dict[str, dict[int, asyncpg.Record]] = {}
        counts: dict[str, int] = {}
        for name in TARGETS:
            rows = await conns[name].fetch(
                f"SELECT d.origin_delivery, d.recipient, d.attempts, d.state, m.id AS message, "
                f"m.origin_node, {digest} AS digest FROM deliveries AS d "
                "JOIN messages AS m ON m.id = d.message_id WHERE d.origin_delivery IS NOT NULL")
            counts[name] = len(rows)
            copies[name] = {row["origin_delivery"]: row for row in rows}
    finally:
        for conn in conns.values():
            await conn.close()
    seen = [origin for rows in copies.values() for origin in rows]
    duplicates = len(seen) - len(set(seen)) + sum(counts.values()) - len(seen)
    lost = mismatched = 0
    for delivery_id, row in source.items():
        copy = copies.get(row["reroute_target"] or "", {}).get(delivery_id)
        if copy is None:
            lost += 1
            continue
        if (copy["message"] != row["rerouted_to_message"] or copy["digest"] != row["digest"]
                or copy["recipient"] != row["recipient"] or copy["attempts"] != row["attempts"]
                or copy["origin_node"] != "a" or copy["state"] != "queued"):
            mismatched += 1
    lost += len(set(seen) - source.keys())
    return {"by_state": by_state, "split": counts, "duplicates": duplicates, "lost": lost,
            "mismatched": mismatched, "source_total": len(source),
            "distinct_origins": len(set(seen)), "expected": count}


async def _receipt_span(server: EmbeddedPostgres) -> tuple[float, float]:
    """Epoch seconds of the first and last receipt on a (the store's clock)."""
    conn = await asyncpg.connect(server.dsn_for("a"))
    try:
        row = await conn.fetchrow(
            "SELECT extract(epoch FROM min(finished_at))::float8 AS first, "
            "extract(epoch FROM max(finished_at))::float8 AS last "
            "FROM deliveries WHERE state = 'rerouted'")
        assert row is not None
        return float(row["first"] or 0.0), float(row["last"] or 0.0)
    finally:
        await conn.close()


#: Reroute's store calls whose time ``--breakdown`` sums (class, method).
TIMED = (("mta.queue.handoff", "HandoffSource", "lease"),
         ("mta.queue.handoff", "HandoffSource", "adopt"),
         ("mta.queue.handoff", "HandoffSource", "contents"),
         ("mta.queue.handoff", "HandoffSource", "receipt"),
         ("mta.queue.handoff", "HandoffSource", "release"),
         ("mta.queue.handoff", "HandoffSource", "left_behind"),
         ("mta.queue.handoff", "HandoffTarget", "insert"),
         ("mta.fleet.reroute", "Rerouter", "_admits"),
         ("mta.fleet.reroute", "Rerouter", "_open_target"),
         ("mta.fleet.reroute", "Rerouter", "_move"),
         ("mta.fleet.reroute", "Rerouter", "run"))
BREAKDOWN_TAG = "REROUTE_BREAKDOWN "


def timed_cli() -> None:
    """``python -c 'from bench.reroute import timed_cli; timed_cli()' fleet reroute …``:
    the CLI as ``python -m mta`` runs it, with the wall time of reroute's store calls
    summed per call and printed to stderr at exit (``--breakdown``)."""
    import atexit
    import functools
    import importlib

    calls: dict[str, list[float]] = {}

    def timed(name: str, method: Any) -> Any:
        @functools.wraps(method)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                calls.setdefault(name, []).append(time.perf_counter() - started)
        return wrapper

    def summary(times: list[float]) -> dict[str, float]:
        quarter = max(1, len(times) // 4)
        return {"s": round(sum(times), 3), "calls": len(times),
                "max_ms": round(max(times) * 1000, 1),
                "first_quarter_ms": round(sum(times[:quarter]) / quarter * 1000, 2),
                "last_quarter_ms": round(sum(times[-quarter:]) / quarter * 1000, 2)}

    for module, cls, method in TIMED:
        owner = getattr(importlib.import_module(module), cls)
        setattr(owner, method, timed(f"{cls}.{method}", getattr(owner, method)))
    atexit.register(lambda: sys.stderr.write(BREAKDOWN_TAG + json.dumps(
        {name: summary(times) for name, times in calls.items()}) + "\n"))
    sys.argv[0] = "mta"
    from mta.cli import main as cli_main
    cli_main()


def _run_async(function: Any, *args: Any) -> Any:
    return asyncio.run(function(*args))


def _in_child(function: Any, *args: Any) -> Any:
    """``asyncio.run(function(*args))`` in a fresh interpreter. Loading and checking 70,000
    rows grows this process, and a child's ru_maxrss starts at its parent's RSS when it
    is spawned (Linux carries the pre-exec high-water mark over exec), so the command's
    own peak is only visible from a parent smaller than it."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_run_async, function, *args).result(timeout=REROUTE_TIMEOUT_S)


def run(count: int, batch: int, size: int, *, profile: Path | None = None,
        fleet_database: bool = False, min_idle: float = 0.9,
        breakdown: bool = False) -> RunResult:
    """One fresh set-up, one reroute, checks; everything is removed afterwards.
    ``fleet_database``: the fleet audit goes to a database on the bench server instead
    of the command's own embedded store in ``--data-dir``."""
    work = Path(tempfile.mkdtemp(prefix="mta-reroute-bench-"))
    server = EmbeddedPostgres(work / "pg")
    nodes: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        server.start()
        loaded = time.monotonic()
        _in_child(_prepare, server, count, size)
        print(f"loaded {count:,} deliveries into a in {time.monotonic() - loaded:.1f} s",
              file=sys.stderr, flush=True)
        ports: set[int] = set()
        entries = []
        admin_ports = []
        for name in ("a", *TARGETS):
            config, smtp, admin = _node_config(work, name, server.dsn_for(name), ports)
            entries.append(f'[[nodes]]\nname = "{name}"\nsmtp = "127.0.0.1:{smtp}"\n'
                           f'admin = "http://127.0.0.1:{admin}"\ntoken = "{TOKEN}"\n'
                           f'config = "{config}"\n')
            if name == "a":
                continue  # no daemon: reroute reads only the source's store
            log = (work / name / "node.log").open("wb")
            logs.append(log)
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "mta", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=work / name))
            admin_ports.append(admin)
        deadline = time.monotonic() + START_TIMEOUT_S
        for node, port in zip(nodes, admin_ports, strict=True):
            while not _ready(port):
                if node.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node on admin port {port} not ready: exit "
                                       f"{node.poll()}")
                time.sleep(0.1)
        fleet = work / "fleet.toml"
        if fleet_database:
            asyncio.run(_create_database(server, "fleet"))
            entries.insert(0, f"[fleet]\ndatabase = {json.dumps(server.dsn_for('fleet'))}\n")
        fleet.write_text("\n".join(entries), encoding="utf-8")
        if breakdown:
            head = [sys.executable, "-c", "from bench.reroute import timed_cli; timed_cli()"]
        elif profile:
            head = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "mta"]
        else:
            head = [sys.executable, "-m", "mta"]
        argv = [*head, "fleet", "reroute", "a", "--to", "b", "--to", "c",
                "--batch", str(batch), "--json", "--fleet", str(fleet),
                "--data-dir", str(work / "fleet-data"), "--reason", "bench"]
        idle = wait_until_idle(min_idle, IDLE_TIMEOUT_S)
        meter = CpuMeter(work)
        pids = {"postgres": server.postmaster_pid() or 0,
                **{name: node.pid for name, node in zip(TARGETS, nodes, strict=True)}}
        busy0 = {name: _tree_cpu(pid) for name, pid in pids.items()}
        commit, uncommitted = _code()
        epoch0 = time.time()
        code, seconds, maxrss, hwm, hwm_at, cli_cpu, out, err = _run_cli(
            argv, work, {**os.environ, "PYTHONPATH": str(REPO)} if breakdown else None)
        other_cpu = meter.others_share()
        cpu = {"cli": round(cli_cpu, 2), **{
            name: round(_tree_cpu(pid) - busy0[name], 2) for name, pid in pids.items()}}
        if code != 0:
            print("\n".join(line for _, line in err[-20:]), file=sys.stderr)
        try:
            report = json.loads(out) if out.strip() else {}
        except json.JSONDecodeError:
            report = {"stdout": out[-2000:]}
        check = _in_child(_verify, server, count)
        first, last = asyncio.run(_receipt_span(server))
        audited, audit_line = next(((t, line) for t, line in err
                                    if line.startswith("audited:")), (None, ""))
        phases = {"vm_hwm_reached_s": round(hwm_at, 2),
                  "first_receipt_s": round(first - epoch0, 2) if first else -1.0,
                  "last_receipt_s": round(last - epoch0, 2) if last else -1.0}
        if last:
            phases["after_last_receipt_s"] = round(seconds - (last - epoch0), 2)
            if audited is not None:
                phases["audit_s"] = round(audited - (last - epoch0), 2)
        shown = " ".join(a if "/" not in a else Path(a).name for a in argv[1:])
        timings: dict[str, Any] = next((json.loads(line[len(BREAKDOWN_TAG):]) for _, line in err
                        if line.startswith(BREAKDOWN_TAG)), {})
        return RunResult(
            deliveries=count, batch=batch, size=size, seconds=round(seconds, 2),
            rate=round(count / seconds, 1), peak_rss_mib=round(maxrss / 1024, 1),
            vm_hwm_mib=round(hwm / 1024, 1), exit_code=code,
            duplicates=check["duplicates"], lost=check["lost"],
            mismatched=check["mismatched"], split=check["split"],
            source_rerouted=int(check["by_state"].get("rerouted", 0)),
            source_pending=int(check["by_state"].get("queued", 0)
                               + check["by_state"].get("deferred", 0)
                               + check["by_state"].get("leased", 0)),
            phases=phases, report=report, breakdown=timings, cpu=cpu,
            other_cpu=round(other_cpu, 3),
            idle_before=round(idle, 3), fleet_database=fleet_database,
            commit=commit, uncommitted=uncommitted,
            audit=audit_line, command=f"python {shown}")
    finally:
        for node in nodes:
            try:
                _stop(node)
            except (OSError, subprocess.TimeoutExpired):
                continue
        for log in logs:
            log.close()
        fleet_pg = work / "fleet-data"
        for version in fleet_pg.rglob("PG_VERSION") if fleet_pg.exists() else []:
            with contextlib.suppress(Exception):  # a leftover audit store, if any
                EmbeddedPostgres(version.parent.parent).stop()
        try:
            server.remove()
        finally:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Run each (--deliveries, --batch) pair on a fresh set-up; JSON lines, then a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, action="append")
    parser.add_argument("--batch", type=int, action="append",
                        help="--batch of the command (repeat; default 500)")
    parser.add_argument("--size", type=int, default=1024, help="body bytes per message")
    parser.add_argument("--profile", type=Path, help="cProfile the command into this file")
    parser.add_argument("--fleet-database", action="store_true",
                        help="audit into a database on the bench server, not an embedded "
                             "store the command starts in --data-dir")
    parser.add_argument("--min-idle", type=float, default=0.9,
                        help="wait until the machine is this idle before each run")
    parser.add_argument("--max-other-cpu", type=float, default=0.10,
                        help="a run where others used more of the machine is not clean")
    parser.add_argument("--attempts", type=int, default=3,
                        help="runs per case until one is clean")
    parser.add_argument("--breakdown", action="store_true",
                        help="sum the wall time of reroute's store calls in the command")
    args = parser.parse_args(argv)
    results = []
    failed = False
    for count in args.deliveries or [7_000, 70_000]:
        for batch in args.batch or [500]:
            for _ in range(max(1, args.attempts)):
                result = run(count, batch, args.size, profile=args.profile,
                             fleet_database=args.fleet_database, min_idle=args.min_idle,
                             breakdown=args.breakdown)
                clean = result.clean(args.max_other_cpu)
                print(json.dumps({**asdict(result), "ok": result.ok, "clean": clean}),
                      flush=True)
                if not result.ok or clean:
                    break
            results.append(result)
            failed |= not result.ok
    print("| deliveries | batch | seconds | deliveries/s | peak RSS MiB (wait4 / own VmHWM) |"
          " duplicates | lost | b / c | CPU s cli / pg / b / c | others' CPU | ok |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in results:
        split = " / ".join(f"{r.split.get(n, 0):,}" for n in TARGETS)
        cpu = " / ".join(f"{r.cpu.get(n, 0):.1f}" for n in ("cli", "postgres", *TARGETS))
        print(f"| {r.deliveries:,} | {r.batch} | {r.seconds:.1f} | {r.rate:,.0f} | "
              f"{r.peak_rss_mib:.0f} / {r.vm_hwm_mib:.0f} | {r.duplicates} | {r.lost} | "
              f"{split} | {cpu} | {r.other_cpu:.0%}"
              f"{'' if r.clean(args.max_other_cpu) else ' (not clean)'} | "
              f"{'yes' if r.ok else 'NO'} |",
              file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
