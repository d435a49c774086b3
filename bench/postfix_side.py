"""Postfix side of the intake benchmark: a throwaway Postfix, smtp-sink and smtp-source.

``start_postfix`` runs a private Postfix instance (``postfix -c DIR start``) whose
config, queue and data directories live in a fresh temp dir. It listens only on
127.0.0.1:PORT, accepts mail from 127.0.0.0/8 and relays everything to an smtp-sink on
127.0.0.1:SINK_PORT. The system Postfix (/etc/postfix, /var/spool/postfix) is not
touched. Queue files are fsynced as usual (Postfix always fsyncs before its 250).

Modes:

* ``accept``: measures how fast Postfix *accepts* (queues) mail. Every message is put
  on hold (``smtpd_data_restrictions = check_client_access static:HOLD``), so cleanup
  writes and fsyncs the queue file and replies 250, and the queue manager never sees
  it. We use this rather than ``defer_transports = smtp`` because with the latter qmgr
  still opens each message, asks trivial-rewrite, has the defer daemon write a log file
  and moves the file to deferred/, all while the intake is running: that is delivery
  work, on the same 2 cores, billed to intake. It also beats relaying to the sink, which
  is the end-to-end case. After the run the hold queue must hold exactly N files and the
  sink must have received nothing, or the run fails.
* ``relay``: delivery runs (qmgr + smtp client, connection caching, 20 parallel
  deliveries by default) to the smtp-sink; the run ends when the sink has counted N
  messages. The sink counts with ``-c``: it prints ``sess=.. quit=.. mesg=N`` each time
  a "." completes, flushed at once, to a file that we read the tail of. (One message
  with R recipients is one sink transaction, since R <= default_destination_recipient_limit.)

Run ``python -m bench.postfix_side matrix`` from the repository root, as root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench.cpu import TreeCpu, postfix_pids
from bench.loadgen import RECIPIENT_DOMAIN, SENDER, check_loopback, run_loadgen

Mode = Literal["accept", "relay"]
Target = Literal["accept", "relay", "sink"]
Generator = Literal["smtp-source", "loadgen"]

LOOPBACK = "127.0.0.1"
SINK_USER = "nobody"
_POLL_INTERVAL = 0.005
_COUNTER = re.compile(rb"mesg=(\d+)\r")

# No chroot, no pickup/showq/local/tlsmgr: only what smtpd -> cleanup -> qmgr -> smtp
# (and bounces) use. "n" in the private column means the socket lives in public/.
_MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _tool(name: str) -> str:
    """Path of a Postfix program (Debian puts them in /usr/sbin, often not on PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} not found; apt-get install postfix")
    return found


def _poll(predicate: Callable[[], bool], timeout: float) -> bool:
    """Call predicate every few ms until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / _POLL_INTERVAL) + 1):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL_INTERVAL)
    return predicate()


def _machine_cpu() -> tuple[float, float]:
    """(idle, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (fields[3] + fields[4]) / hz, sum(fields) / hz  # idle + iowait, all


def cpu_idle(sample: float = 1.0) -> float:
    """Fraction of the whole machine's CPU time that was idle over ``sample`` seconds."""
    idle0, total0 = _machine_cpu()
    time.sleep(sample)
    idle1, total1 = _machine_cpu()
    return (idle1 - idle0) / max(total1 - total0, 1e-9)


class CpuMeter:
    """Share of the machine's CPU that *other* programs used while we measured.

    Sums user+system time, including reaped children's, over every user-space process
    that is not ours, at start and at the end: reaping moves a child's time into its
    parent, so the difference of the two sums is what others used in between, whatever
    started or exited meanwhile. Ours: this process and its descendants (smtp-source,
    smtp-sink, the node and its processes) and every process whose cwd is under ``root``
    (the Postfix daemons). Kernel threads (e.g. the journal thread doing everyone's
    fsyncs) are left out.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.start = time.monotonic()
        self.others0 = self._others()

    def _others(self) -> float:
        me = os.getpid()
        stats: dict[int, list[str]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == 2 or \
                        Path(os.readlink(entry / "cwd")).is_relative_to(self.root):
                    continue  # kernel thread, or one of ours (the Postfix daemons)
                stats[int(entry.name)] = stat
        ours = {me}
        for _ in range(len(stats)):  # descendants of ours: a node's forked processes
            grown = {pid for pid, stat in stats.items() if int(stat[1]) in ours} - ours
            if not grown:
                break
            ours |= grown
        ticks = sum(sum(int(x) for x in stat[11:15])  # utime stime cutime cstime
                    for pid, stat in stats.items() if pid not in ours)
        return ticks / os.sysconf("SC_CLK_TCK")

    def others_share(self) -> float:
        """Others' CPU seconds since creation / (elapsed seconds * CPUs)."""
        elapsed = time.monotonic() - self.start
        return max(self._others() - self.others0, 0.0) / (elapsed * (os.cpu_count() or 1))


def wait_until_idle(min_idle: float = 0.9, timeout: float = 600.0) -> float:
    """Wait (up to ``timeout`` s) until other work leaves the CPU idle; return the idle share.

    Benchmarks on a shared box are meaningless while e.g. a test suite runs beside them.
    """
    idle = cpu_idle()
    for _ in range(int(timeout)):
        if idle >= min_idle:
            break
        idle = cpu_idle()
    return idle


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _pids_under(root: Path) -> list[int]:
    """Processes whose working directory is inside ``root`` (our Postfix and sink)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")).is_relative_to(root):
                pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def workdir(base_dir: Path | None) -> Iterator[Path]:
    """A temp dir that the postfix user can traverse; removed afterwards, no matter what."""
    root = Path(tempfile.mkdtemp(prefix="postfix-bench-", dir=base_dir)).resolve()
    try:
        root.chmod(0o755)
        yield root
    finally:
        if not _poll(lambda: not _pids_under(root), timeout=10.0):
            for pid in _pids_under(root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class SmtpSink:
    """A running smtp-sink on 127.0.0.1 whose message counter we can read."""

    port: int
    process: subprocess.Popen[bytes]
    counter_file: Path

    def delivered(self) -> int:
        """Messages ("." commands) the sink has accepted so far."""
        with self.counter_file.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 256, 0))
            counts = _COUNTER.findall(f.read())
        return int(counts[-1]) if counts else 0

    def wait_for(self, count: int, timeout: float) -> float:
        """Wait until the sink has ``count`` messages; return the perf_counter() then."""
        if not _poll(lambda: self.delivered() >= count, timeout):
            raise TimeoutError(f"sink has {self.delivered()} of {count} messages")
        return time.perf_counter()


@contextlib.contextmanager
def start_smtp_sink(
    port: int, workdir: Path, backlog: int = 256, extra_args: Sequence[str] = ()
) -> Iterator[SmtpSink]:
    """Run ``smtp-sink -c`` on 127.0.0.1:port (as nobody) for the duration of the block.

    ``extra_args`` go before the address (e.g. ``["-D", path]`` to dump every transaction).
    """
    if not _port_is_free(port):
        raise RuntimeError(f"127.0.0.1:{port} is already in use")
    counter_file = workdir / "sink.counters"
    cmd = [_tool("smtp-sink"), "-c", "-u", SINK_USER, *extra_args, f"{LOOPBACK}:{port}",
           str(backlog)]
    with counter_file.open("wb") as out, (workdir / "sink.err").open("wb") as err:
        process = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=workdir)
    try:
        if not _poll(lambda: process.poll() is None and _accepts_connections(port), 10.0):
            raise RuntimeError(f"smtp-sink did not start: {(workdir / 'sink.err').read_text()}")
        yield SmtpSink(port, process, counter_file)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@dataclass(frozen=True)
class PostfixInstance:
    """A running private Postfix instance and its sink."""

    port: int
    mode: Mode
    root: Path
    sink: SmtpSink

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    def queued(self, queue: str = "hold") -> int:
        """Number of queue files in one of Postfix's queues (hold, incoming, deferred...)."""
        return sum(len(files) for _, _, files in os.walk(self.queue_dir / queue))

    def maillog(self) -> str:
        """The instance's log (maillog_file), for diagnosing failures; "" if none yet."""
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self) -> list[int]:
        """Master and every daemon of this instance (not its smtp-sink): ``bench.cpu``."""
        return postfix_pids(self.queue_dir)

    def in_flight(self) -> int:
        """Queue files not yet final: incoming, active and deferred."""
        return sum(self.queued(q) for q in ("incoming", "active", "deferred"))

    def outcomes(self) -> MaillogOutcomes:
        """What the instance's log says it did with each recipient (see MaillogOutcomes)."""
        return MaillogOutcomes.read(self.root / "maillog")


_STATUS = re.compile(rb" to=<([^>]*)>,.* status=(\w+)")


@dataclass(frozen=True)
class MaillogOutcomes:
    """Delivery outcomes in a Postfix maillog: one ``to=<..>, .. status=..`` line each.

    ``sent`` counts status=sent lines, ``sent_unique`` distinct recipients among them:
    ``expected - sent_unique`` were lost (or not yet delivered), ``sent - sent_unique``
    delivered twice. ``other`` counts deferred, bounced and any other status.
    """

    sent: int
    sent_unique: int
    other: dict[str, int]

    @classmethod
    def read(cls, path: Path) -> MaillogOutcomes:
        """Parse the log at ``path`` (empty if missing)."""
        seen: set[bytes] = set()
        sent = 0
        other: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            for line in f:
                match = _STATUS.search(line)
                if match is None:
                    continue
                if match[2] == b"sent":
                    sent += 1
                    seen.add(match[1].lower())
                else:
                    status = match[2].decode()
                    other[status] = other.get(status, 0) + 1
        return cls(sent, len(seen), other)


def _main_cf(root: Path, sink_port: int, mode: Mode, overrides: Mapping[str, str]) -> str:
    params = {
        "compatibility_level": "3.7",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "myhostname": "postfix-bench.invalid",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "inet_interfaces": LOOPBACK,
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "relayhost": f"[{LOOPBACK}]:{sink_port}",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
    }
    if mode == "accept":
        params["smtpd_data_restrictions"] = "check_client_access static:HOLD"
    params.update(overrides)
    return "".join(f"{key} = {value}\n" for key, value in params.items())


def _postfix(config_dir: Path, action: str) -> int:
    """Run ``postfix -c config_dir action``; its output goes to the instance's log dir.

    (Output goes to a file, not a pipe, so daemons that keep the descriptor cannot stall
    us. Postfix prints errors only to a terminal: on failure see ``postfix -c DIR check``.)
    """
    with (config_dir.parent / "postfix-command.out").open("ab") as out:
        cmd = [_tool("postfix"), "-c", str(config_dir), action]
        return subprocess.run(cmd, stdout=out, stderr=out, timeout=60, check=False).returncode


@contextlib.contextmanager
def start_postfix(
    port: int = 2625,
    *,
    sink_port: int = 2626,
    mode: Mode = "accept",
    base_dir: Path | None = None,
    main_cf: Mapping[str, str] | None = None,
    master_cf: str = "",
) -> Iterator[PostfixInstance]:
    """Run a throwaway Postfix on 127.0.0.1:port relaying to an smtp-sink on sink_port.

    Must run as root. ``main_cf`` overrides or adds main.cf parameters, ``master_cf`` is
    appended to master.cf (e.g. extra transports). On exit (also on error) Postfix and
    the sink are stopped and the temp dir is removed.
    """
    if os.geteuid() != 0:
        raise PermissionError("a private Postfix instance must be started as root")
    if not _port_is_free(port):
        raise RuntimeError(f"127.0.0.1:{port} is already in use")
    with workdir(base_dir) as root, start_smtp_sink(sink_port, root) as sink:
        conf = root / "conf"
        conf.mkdir()
        (root / "queue").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix", "postfix")
        (conf / "main.cf").write_text(_main_cf(root, sink_port, mode, main_cf or {}))
        (conf / "master.cf").write_text(_MASTER_CF.format(listen=f"{LOOPBACK}:{port}")
                                        + master_cf)
        instance = PostfixInstance(port, mode, root, sink)
        try:
            if _postfix(conf, "start") != 0:
                raise RuntimeError(
                    f"postfix -c {conf} start failed (postfix logs errors only to a tty; "
                    f"try `postfix -c DIR check` by hand):\n{instance.maillog()}"
                )
            yield instance
        finally:
            _postfix(conf, "stop")  # waits up to 5 s, then SIGKILLs the process group


@dataclass(frozen=True)
class SourceResult:
    """Wall-clock outcome of one smtp-source run."""

    command: list[str]
    messages: int
    sessions: int
    size: int
    recipients: int
    seconds: float
    rate: float
    cpu_seconds: float  # smtp-source's own CPU time


def run_smtp_source(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    reuse_connections: bool = True,
    timeout: float = 600.0,
) -> SourceResult:
    """Send mail with Postfix's smtp-source and time it; raise if it fails.

    Flags: ``-s`` sessions in parallel, ``-m`` messages in all, ``-l`` body bytes,
    ``-r`` recipients per message, ``-N`` unique recipient names (defeats Postfix's
    address caches), ``-f``/``-t`` addresses, ``-c`` a counter we check reaches N, and
    ``-d`` (the default here): keep each session's connection for its next message,
    as a busy relaying peer does, so we time per-message work rather than TCP and
    smtpd process hand-off. smtp-source sends HELO, no PIPELINING, and exits non-zero
    on any rejected command.
    """
    check_loopback(host)
    cmd = [
        _tool("smtp-source"),
        "-c",
        "-N",
        "-s", str(sessions),
        "-m", str(messages),
        "-l", str(size),
        "-r", str(recipients),
        "-f", SENDER,
        "-t", f"r@{RECIPIENT_DOMAIN}",
        *(["-d"] if reuse_connections else []),
        f"{host}:{port}",
    ]  # fmt: skip
    before = os.times()
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - started
    after = os.times()
    cpu = sum(after[2:4]) - sum(before[2:4])  # children's user + system
    counts = re.findall(rb"\d+", done.stdout)
    sent = int(counts[-1]) if counts else 0
    if done.returncode != 0 or sent != messages:
        raise RuntimeError(f"smtp-source sent {sent}/{messages}: {done.stderr.decode()}")
    return SourceResult(cmd, messages, sessions, size, recipients, seconds, messages / seconds, cpu)


@dataclass(frozen=True)
class Workload:
    """One benchmark shape: N messages over S sessions, body size, recipients each."""

    name: str
    messages: int
    sessions: int
    size: int
    recipients: int = 1


WORKLOADS = (
    Workload("1k-x1", messages=5000, sessions=20, size=1024, recipients=1),
    Workload("1k-x5", messages=5000, sessions=20, size=1024, recipients=5),
    Workload("1m-x1", messages=300, sessions=20, size=1 << 20, recipients=1),
)


@dataclass(frozen=True)
class Measurement:
    """One run: accept time is the generator's wall time; done_seconds adds delivery.

    ``generator_cpu`` is the load generator's CPU seconds (its own cost); ``other_cpu``
    the share of the machine that other programs used meanwhile (see CpuMeter).
    """

    workload: str
    target: Target
    generator: Generator
    messages: int
    accept_seconds: float
    accept_rate: float
    done_seconds: float
    done_rate: float
    p50_ms: float | None
    p99_ms: float | None
    generator_cpu: float
    other_cpu: float
    command: list[str]
    #: CPU seconds of the instance (master and every daemon, not smtp-sink; ``bench.cpu``)
    #: from the generator's start until done with nothing left in incoming/active/deferred.
    postfix_cpu_s: float | None = None
    sink_cpu_s: float | None = None
    #: Transactions the sink counted, and (relay) the maillog's outcomes per recipient.
    sink_messages: int | None = None
    outcomes: dict[str, Any] | None = None


def measure(
    workload: Workload,
    target: Target,
    *,
    generator: Generator = "smtp-source",
    reuse_connections: bool = True,
    port: int = 2625,
    sink_port: int = 2626,
    base_dir: Path | None = None,
    main_cf: Mapping[str, str] | None = None,
    timeout: float = 600.0,
) -> Measurement:
    """Run one workload against a fresh Postfix (``accept``/``relay``) or a bare sink.

    ``sink`` sends straight to smtp-sink: the generator's own ceiling. Done time is when
    the sink has all N messages (relay, sink) or when accept finished and the hold queue
    holds all N (accept).
    """
    with contextlib.ExitStack() as stack:
        instance: PostfixInstance | None = None
        if target == "sink":
            root = stack.enter_context(workdir(base_dir))
            sink = stack.enter_context(start_smtp_sink(sink_port, root))
            dest = sink_port
        else:
            instance = stack.enter_context(
                start_postfix(
                    port, sink_port=sink_port, mode=target, base_dir=base_dir, main_cf=main_cf
                )
            )
            root, sink, dest = instance.root, instance.sink, port
        baseline = sink.delivered()
        w = workload
        meter = CpuMeter(root)
        postfix_cpu = TreeCpu(instance.pids) if instance is not None else None
        sink_cpu = TreeCpu(lambda: [sink.process.pid])
        started = time.perf_counter()
        p50: float | None = None
        p99: float | None = None
        if generator == "smtp-source":
            source = run_smtp_source(
                LOOPBACK,
                dest,
                messages=w.messages,
                sessions=w.sessions,
                size=w.size,
                recipients=w.recipients,
                reuse_connections=reuse_connections,
                timeout=timeout,
            )
            accepted, command, generator_cpu = source.seconds, source.command, source.cpu_seconds
        else:
            result = run_loadgen(
                LOOPBACK,
                dest,
                messages=w.messages,
                sessions=w.sessions,
                size=w.size,
                recipients=w.recipients,
                reuse_connections=reuse_connections,
                timeout=timeout,
            )
            accepted, p50, p99 = result.seconds, result.p50_ms, result.p99_ms
            generator_cpu = result.cpu_seconds
            command = ["python", "-m", "bench.loadgen", *_loadgen_args(w, dest, reuse_connections)]
        if instance is not None and instance.mode == "accept":
            held = instance
            if not _poll(lambda: held.queued("hold") >= w.messages, 10.0):
                raise RuntimeError(f"hold queue has {held.queued('hold')} of {w.messages} files")
            done = time.perf_counter()
            if sink.delivered() != baseline:
                raise RuntimeError("accept mode delivered mail; the HOLD rule did not apply")
        else:
            done = sink.wait_for(baseline + workload.messages, timeout)
        if instance is not None:
            _poll(lambda: instance.in_flight() == 0, 10.0)  # qmgr removes the queue files
        postfix_seconds = postfix_cpu.stop() if postfix_cpu is not None else None
        sink_seconds = sink_cpu.stop()
        outcomes = None
        if instance is not None and instance.mode == "relay":
            expected = w.messages * w.recipients
            _poll(lambda: instance.outcomes().sent >= expected, 5.0)  # postlogd may lag
            outcomes = asdict(instance.outcomes())
        other_cpu = meter.others_share()
        sink_messages = sink.delivered() - baseline
    n = workload.messages
    return Measurement(
        workload.name, target, generator, n, accepted, n / accepted,
        done - started, n / (done - started), p50, p99, generator_cpu, other_cpu, command,
        postfix_seconds, sink_seconds, sink_messages, outcomes,
    )  # fmt: skip


def _loadgen_args(workload: Workload, port: int, reuse_connections: bool) -> list[str]:
    return [
        "--port", str(port),
        "-n", str(workload.messages),
        "-s", str(workload.sessions),
        "--size", str(workload.size),
        "-r", str(workload.recipients),
        *([] if reuse_connections else ["--no-reuse"]),
    ]  # fmt: skip


def _serve(args: argparse.Namespace) -> None:
    with start_postfix(args.port, sink_port=args.sink_port, mode=args.mode) as instance:
        print(
            f"postfix ({args.mode}) on {LOOPBACK}:{args.port}, sink on {args.sink_port}, "
            f"dir {instance.root}; Ctrl-C or {args.seconds:.0f} s to stop",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.seconds)
        print(f"sink received {instance.sink.delivered()}, hold queue {instance.queued()}")


def _matrix(args: argparse.Namespace) -> None:
    """Print one JSON line per run, then a median table of the clean runs to stderr."""
    chosen = [w for w in WORKLOADS if not args.workload or w.name in args.workload]
    main_cf = dict(kv.split("=", 1) for kv in args.set)
    clean: dict[tuple[str, str], list[Measurement]] = {}
    for _ in range(args.repeat):  # repeats outermost, so a noisy minute hits one of each
        for workload in chosen:
            for target in args.target:
                for _attempt in range(args.attempts):
                    idle = wait_until_idle(args.min_idle, args.idle_timeout)
                    m = measure(
                        workload,
                        target,
                        generator=args.generator,
                        reuse_connections=not args.no_reuse,
                        port=args.port,
                        sink_port=args.sink_port,
                        main_cf=main_cf,
                    )
                    ok = m.other_cpu <= args.max_other_cpu
                    row = {**asdict(m), "idle_before": round(idle, 3), "clean": ok}
                    print(json.dumps(row), flush=True)
                    if ok:
                        clean.setdefault((workload.name, target), []).append(m)
                        break
    for (name, target), runs in clean.items():
        cores = statistics.median(r.generator_cpu / r.accept_seconds for r in runs)
        line = (
            f"{name:6} {target:6} runs={len(runs)} "
            f"accept/s={statistics.median(r.accept_rate for r in runs):8.1f} "
            f"done/s={statistics.median(r.done_rate for r in runs):8.1f} "
            f"generator_cores={cores:.2f}"
        )
        if runs[0].p50_ms is not None:
            line += "".join(
                f" {key}={statistics.median(getattr(r, key) for r in runs):.1f}"
                for key in ("p50_ms", "p99_ms")
            )
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``matrix`` (measure), ``serve`` (keep an instance up)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=2625)
    parser.add_argument("--sink-port", type=int, default=2626)
    sub = parser.add_subparsers(dest="command", required=True)
    matrix = sub.add_parser("matrix", help="run workloads, print one JSON line per run")
    matrix.add_argument(
        "--target", nargs="+", choices=["accept", "relay", "sink"], default=["accept", "relay"]
    )
    matrix.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS])
    matrix.add_argument("--generator", choices=["smtp-source", "loadgen"], default="smtp-source")
    matrix.add_argument("--repeat", type=int, default=1)
    matrix.add_argument("--min-idle", type=float, default=0.9, help="CPU idle share to wait for")
    matrix.add_argument("--idle-timeout", type=float, default=600.0, help="max wait per run, s")
    matrix.add_argument(
        "--max-other-cpu", type=float, default=0.05, help="rerun if others used more CPU share"
    )
    matrix.add_argument("--attempts", type=int, default=5, help="max tries per run")
    matrix.add_argument("--no-reuse", action="store_true", help="one connection per message")
    matrix.add_argument(
        "--set", action="append", default=[], metavar="PARAM=VALUE", help="extra main.cf parameter"
    )
    serve = sub.add_parser("serve", help="run an instance until Ctrl-C or --seconds")
    serve.add_argument("--mode", choices=["accept", "relay"], default="accept")
    serve.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # so teardown runs on kill
    if args.command == "matrix":
        _matrix(args)
    else:
        _serve(args)


if __name__ == "__main__":
    main()
