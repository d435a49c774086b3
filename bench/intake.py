"""Intake benchmark: mta-fleet against Postfix on the same workloads, same machine, same run.

For each workload a fresh node (``python -m mta serve``, embedded PostgreSQL in a temp
data dir) takes N messages over S sessions from Postfix's ``smtp-source`` (or our
``bench.loadgen`` when Postfix is not installed, or with ``--generator loadgen``, which
also gives p50/p99 accept latency). Then a throwaway Postfix takes the same load in
accept-only mode (``bench.postfix_side``). Reported per workload: accepted messages/s
for both and their ratio, p50/p99 accept latency, the node's peak RSS (VmHWM of every
node process) and the most database connections the node held.

Run from the repository root, as root (Postfix needs it):

    python -m bench.intake                       # all workloads, smtp-source, 1 process
    python -m bench.intake --processes 2 --workload 1k-x1 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg

from bench.loadgen import run_loadgen
from bench.postfix_side import WORKLOADS, Workload, measure, run_smtp_source, wait_until_idle
from mta.queue import EmbeddedPostgres

NODE_PORT = 2600
ADMIN_PORT = 9400
START_TIMEOUT_S = 60.0
#: Intake only: delivery is on by default in a node, and would also resolve bench.example.
INTAKE_ONLY = "[delivery]\nenabled = false\n"


@dataclass(frozen=True)
class NodeRun:
    """One workload against one fresh node."""

    workload: str
    processes: int
    generator: str
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    peak_rss_mb: float
    max_db_connections: int


#: Separate intake and delivery processes (``--split I+D``): the node runs I + D
#: processes with ``node.intake_processes`` / ``node.delivery_processes`` instead of
#: ``node.processes`` (None: every process does both).
SPLIT: tuple[int, int] | None = None


def parse_split(text: str) -> tuple[int, int]:
    """``I+D`` as (intake processes, delivery processes), each at least 1."""
    intake, plus, delivery = text.partition("+")
    if not (plus and intake.isdigit() and delivery.isdigit() and int(intake) and int(delivery)):
        raise ValueError(f"--split wants I+D with I, D >= 1, got {text!r}")
    return int(intake), int(delivery)


def add_split_argument(parser: argparse.ArgumentParser) -> None:
    """``--split I+D``: separate intake and delivery processes instead of --processes."""
    parser.add_argument("--split", metavar="I+D",
                        help="I intake + D delivery processes instead of --processes")


def apply_split(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Take ``--split`` into :data:`SPLIT`, and its total as ``args.processes``."""
    global SPLIT
    if not args.split:
        return
    try:
        SPLIT = parse_split(args.split)
    except ValueError as exc:
        parser.error(str(exc))
    args.processes = sum(SPLIT)


def _processes_config(processes: int) -> str:
    if SPLIT is None:
        return f"processes = {processes}"
    if sum(SPLIT) != processes:
        raise ValueError(f"split {SPLIT} is not {processes} processes")
    return f"intake_processes = {SPLIT[0]}\ndelivery_processes = {SPLIT[1]}"


def _node_config(data_dir: Path, processes: int, extra: str = "") -> str:
    return f"""
[node]
name = "bench"
data_dir = "{data_dir}"
{_processes_config(processes)}
[smtp]
listen = "127.0.0.1:{NODE_PORT}"
hostname = "mx.bench.example"
max_sessions = 2000
max_message_size = "20MiB"
[admission]
min_free_disk = 0
[admin]
listen = "127.0.0.1:{ADMIN_PORT}"
[log]
level = "warning"
{extra}"""


def _healthy() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}/readyz", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def process_tree(root: int) -> list[int]:
    pids = [root]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == root:
                pids.append(int(entry.name))
    return pids


def vm_hwm_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class ConnectionSampler:
    """Counts the node's database connections every 100 ms in a thread of its own."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.maximum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            while not self._stop.is_set():
                count = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'mta/%'"
                )
                self.maximum = max(self.maximum, int(count))
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def running_node(
    processes: int, *, extra_config: str = INTAKE_ONLY, base_dir: Path | None = None,
    prepare: Callable[[Path], None] | None = None, dedup: int = 0,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A fresh node with its own embedded PostgreSQL; stopped and removed afterwards.

    ``extra_config`` is appended to the node's TOML (default: delivery off), the temp dir
    is made in ``base_dir``, and ``prepare(data_dir)`` runs before the node starts (e.g.
    to preload its store). With ``dedup`` (its connections per process) the node checks
    and records dedup keys in its own embedded server (as a fleet database on the same
    host would).
    """
    work = Path(tempfile.mkdtemp(prefix="mta-bench-", dir=base_dir))
    if dedup:
        keys = EmbeddedPostgres(work / "data" / "postgres").dsn
        extra_config += (f'\n[dedup]\nenabled = true\ndatabase = "{keys}"\n'
                         f"connections = {dedup}\n")
    config = work / "node.toml"
    config.write_text(_node_config(work / "data", processes, extra_config))
    if prepare is not None:
        prepare(work / "data")
    log = (work / "node.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy():
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not start: {(work / 'node.log').read_text()}")
            time.sleep(0.1)
        yield node, work / "data"
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(10)
        log.close()
        EmbeddedPostgres(work / "data" / "postgres").remove()
        shutil.rmtree(work, ignore_errors=True)


def run_node(workload: Workload, processes: int, generator: str,
             dedup: int = 0) -> NodeRun:
    """Drive one workload into a fresh node and measure it."""
    with running_node(processes, dedup=dedup) as (node, data_dir):
        dsn = EmbeddedPostgres(data_dir / "postgres").dsn
        w = workload
        with ConnectionSampler(dsn) as sampler:
            if generator == "smtp-source":
                source = run_smtp_source("127.0.0.1", NODE_PORT, messages=w.messages,
                                         sessions=w.sessions, size=w.size,
                                         recipients=w.recipients)
                rate, p50, p99 = source.rate, None, None
            else:
                result = run_loadgen("127.0.0.1", NODE_PORT, messages=w.messages,
                                     sessions=w.sessions, size=w.size, recipients=w.recipients)
                rate, p50, p99 = result.rate, result.p50_ms, result.p99_ms
            peak_kb = max(vm_hwm_kb(pid) for pid in process_tree(node.pid))
        return NodeRun(w.name, processes, generator, rate, p50, p99, peak_kb / 1024,
                       sampler.maximum)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print one JSON line per run and a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS])
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--generator", choices=["smtp-source", "loadgen"], default=None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; medians reported")
    parser.add_argument("--no-postfix", action="store_true", help="skip the Postfix side")
    parser.add_argument("--dedup", type=int, default=0, metavar="CONNECTIONS",
                        help="the node with [dedup] on and this many dedup connections per "
                             "process (keys in its own embedded server); 0: off")
    args = parser.parse_args(argv)
    have_postfix = shutil.which("smtp-source") is not None or Path("/usr/sbin/smtp-source").exists()
    generator = args.generator or ("smtp-source" if have_postfix else "loadgen")
    compare = have_postfix and not args.no_postfix and os.geteuid() == 0
    chosen = [w for w in WORKLOADS if not args.workload or w.name in args.workload]
    rows = []
    for workload in chosen:
        node_runs = []
        postfix_rates = []
        for _ in range(args.repeat):
            wait_until_idle()
            node_runs.append(run_node(workload, args.processes, generator, args.dedup))
            print(json.dumps({"side": "mta", **asdict(node_runs[-1])}), flush=True)
            latency = run_node(workload, args.processes, "loadgen") if generator != "loadgen" \
                else node_runs[-1]
            node_runs[-1] = NodeRun(**{**asdict(node_runs[-1]), "p50_ms": latency.p50_ms,
                                       "p99_ms": latency.p99_ms})
            if compare:
                wait_until_idle()
                result = measure(workload, "accept", generator=generator)  # type: ignore[arg-type]
                postfix_rates.append(result.accept_rate)
                print(json.dumps({"side": "postfix", **asdict(result)}), flush=True)
        rate = statistics.median(run.rate for run in node_runs)
        postfix = statistics.median(postfix_rates) if postfix_rates else None
        rows.append((workload, rate, postfix, node_runs))
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, {platform.platform()}; "
          f"generator: {generator}; node processes: {args.processes}; "
          f"repeat: {args.repeat} (medians)\n")
    print("| workload | mta msg/s | Postfix msg/s | ratio | p50 ms | p99 ms | peak RSS MB "
          "| DB conns |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, rate, postfix, runs in rows:
        ratio = f"{rate / postfix:.2f}x" if postfix else "n/a"
        p50 = statistics.median(r.p50_ms for r in runs if r.p50_ms is not None)
        p99 = statistics.median(r.p99_ms for r in runs if r.p99_ms is not None)
        print(f"| {workload.name} | {rate:.0f} | {f'{postfix:.0f}' if postfix else 'n/a'} | "
              f"{ratio} | {p50:.1f} | {p99:.1f} | {max(r.peak_rss_mb for r in runs):.0f} | "
              f"{max(r.max_db_connections for r in runs)} |")


if __name__ == "__main__":
    main()
