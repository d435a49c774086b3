"""Every workload, mta-fleet and Postfix side by side, in one command (issue 13).

Workloads (``--workload NAME``, repeatable; default all):

* ``1k-x1``, ``1k-x5``, ``1m-x1``: ``bench.relay``'s relay runs (smtp-source -> node or
  Postfix -> smtp-sink; ``bench.relay.run_mta`` and ``bench.postfix_side.measure``);
* ``postfix-client``: smtp-source -> a client Postfix -> node or a relaying Postfix ->
  smtp-sink, with a per-command latency probe (``bench.workloads``);
* ``newsletter``: one 100 KB message to 30,000 recipients over 50 domains, 30 messages
  of 1000 recipients; Postfix with one next hop (``nexthop``) and, as a second row, with
  a queue per domain (``per-domain``; ``--newsletter-postfix``);
* ``realistic-1m``: 300 MIME messages of 1 MiB (HTML + base64 PDF-like attachment).

Each run (a fresh node or a fresh Postfix) prints one JSON line; at the end a Markdown
table compares the sides: rate, CPU ms per unit (bench.cpu: node + its PostgreSQL
against every process of the relaying Postfix; smtp-sink and the load generators on
neither side), loss, duplicates, sink transactions, checks. ``--quick`` makes every
count small (a smoke run of a few minutes). Exit status 1 when a check failed.

    python -m bench.suite --quick
    python -m bench.suite                       # the real sizes
    python -m bench.suite --workload newsletter --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import bench.intake as bench_intake
from bench.postfix_side import WORKLOADS, measure, wait_until_idle
from bench.relay import POSTFIX_PORT, POSTFIX_SINK_PORT, code_version, run_mta
from bench.workloads import (
    PROBE_COMMANDS,
    Load,
    SideRun,
    client_load,
    newsletter_load,
    newsletter_postfix_config,
    node_loss_duplicates,
    realistic_load,
    run_node_side,
    run_postfix_side,
)

RELAY_NAMES = tuple(w.name for w in WORKLOADS)
NAMES = (*RELAY_NAMES, "postfix-client", "newsletter", "realistic-1m")


@dataclass(frozen=True)
class Sizes:
    """How much each workload sends."""

    relay: dict[str, int] = field(default_factory=lambda: {w.name: w.messages
                                                           for w in WORKLOADS})
    client_messages: int = 2000
    probe_transactions: int = 200
    newsletter_recipients: int = 30_000
    realistic_messages: int = 300


FULL = Sizes()
QUICK = Sizes({"1k-x1": 1000, "1k-x5": 500, "1m-x1": 50}, client_messages=1000,
              probe_transactions=100, newsletter_recipients=10_000, realistic_messages=60)


def _failed(workload: str, side: str, exc: BaseException) -> SideRun:
    """A run that raised (a timeout, a rejected command): no numbers, one error."""
    last = traceback.format_exception(exc)[-1].strip()
    return SideRun(workload, side, "-", 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, False,
                   [f"{type(exc).__name__}: {exc}"[:2000]], 0.0, {"traceback": last})


def relay_mta(name: str, messages: int, processes: int) -> SideRun:
    """``bench.relay.run_mta`` as a SideRun."""
    w = replace(next(w for w in WORKLOADS if w.name == name), messages=messages)
    run = run_mta(w, processes=processes)
    loss, duplicates = node_loss_duplicates(run.check, w.messages * w.recipients)
    cpu = run.node_cpu_s + run.postgres_cpu_s
    return SideRun(name, "mta", "msg", w.messages, run.done_seconds, run.done_rate, cpu,
                   cpu / w.messages, run.sink_cpu_s, run.check["sink_messages"], loss,
                   duplicates, run.ok, run.check["errors"], run.other_cpu,
                   {"relay_run": asdict(run)})


def relay_postfix(name: str, messages: int) -> SideRun:
    """``bench.postfix_side.measure(.., "relay")`` as a SideRun, checked by its maillog
    (every recipient sent once, nothing else) and its sink (one transaction each)."""
    w = replace(next(w for w in WORKLOADS if w.name == name), messages=messages)
    m = measure(w, "relay", port=POSTFIX_PORT, sink_port=POSTFIX_SINK_PORT,
                timeout=max(120.0, w.messages / 20))
    expected = w.messages * w.recipients
    out = m.outcomes or {"sent": 0, "sent_unique": 0, "other": {}}
    errors = []
    if out["sent_unique"] != expected:
        errors.append(f"maillog: {out['sent_unique']} recipients sent, expected {expected}")
    if out["sent"] != out["sent_unique"]:
        errors.append(f"maillog: {out['sent'] - out['sent_unique']} sent more than once")
    if out["other"]:
        errors.append(f"maillog: other outcomes {out['other']}")
    if m.sink_messages != w.messages:
        errors.append(f"sink counted {m.sink_messages} transactions, expected {w.messages}")
    cpu = m.postfix_cpu_s or 0.0
    return SideRun(name, "postfix", "msg", w.messages, m.done_seconds, m.done_rate, cpu,
                   cpu / w.messages, m.sink_cpu_s or 0.0, m.sink_messages or 0,
                   max(expected - out["sent_unique"], 0), out["sent"] - out["sent_unique"],
                   not errors, errors, m.other_cpu, {"measurement": asdict(m)})


def plan(name: str, sizes: Sizes, processes: int, newsletter_modes: list[str]
         ) -> list[tuple[str, str, Callable[[], SideRun]]]:
    """The runs of one workload: (table row, side, run)."""
    if name in RELAY_NAMES:
        n = sizes.relay[name]
        return [(name, "mta", lambda: relay_mta(name, n, processes)),
                (name, "postfix", lambda: relay_postfix(name, n))]
    load: Load
    if name == "postfix-client":
        load = client_load(sizes.client_messages, sizes.probe_transactions)
        exact = load.messages + load.probe
        return [(name, "mta", lambda: run_node_side(load, processes)),
                (name, "postfix", lambda: run_postfix_side(load, sink_exact=exact))]
    if name == "realistic-1m":
        load = realistic_load(sizes.realistic_messages)
        return [(name, "mta", lambda: run_node_side(load, processes)),
                (name, "postfix", lambda: run_postfix_side(load, sink_exact=load.messages))]
    load = newsletter_load(sizes.newsletter_recipients)
    runs: list[tuple[str, str, Callable[[], SideRun]]] = [
        (name, "mta", lambda: run_node_side(load, processes))]
    for mode in newsletter_modes:
        main_cf, master_cf = newsletter_postfix_config(mode)
        row = name if mode == "nexthop" else f"{name} ({mode})"

        def run(main_cf: dict[str, str] = main_cf, master_cf: str = master_cf,
                row: str = row) -> SideRun:
            return replace(run_postfix_side(load, main_cf, master_cf), workload=row)

        runs.append((row, "postfix", run))
    return runs


def attempts(row: str, side: str, run: Callable[[], SideRun], args: argparse.Namespace
             ) -> list[tuple[SideRun, bool]]:
    """Run until others used at most ``--max-other-cpu``; print each attempt as JSON."""
    results = []
    for attempt in range(1, args.attempts + 1):
        idle = wait_until_idle(args.min_idle, args.idle_timeout)
        code = code_version()
        try:
            result = run()
        except Exception as exc:  # a failed run is reported, and the suite goes on
            result = _failed(row, side, exc)
        clean = result.other_cpu <= args.max_other_cpu
        results.append((result, clean))
        print(json.dumps({**asdict(result), "idle_before": round(idle, 3), "clean": clean,
                          "attempt": attempt, "code": code}, default=str), flush=True)
        if clean or not result.ok:
            break
    return results


def _chosen(runs: list[tuple[SideRun, bool]]) -> list[SideRun]:
    """Runs for the medians: clean ones that passed, else those that passed, else all."""
    passed = [(r, clean) for r, clean in runs if r.ok]
    return [r for r, c in passed if c] or [r for r, _ in passed] or [r for r, _ in runs]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(rows: list[str], results: dict[tuple[str, str], list[tuple[SideRun, bool]]],
          mta_row: Callable[[str], str]) -> list[str]:
    """The Markdown comparison, one line per row (a newsletter variant reuses the mta
    run of ``newsletter``)."""
    out = ["| workload | unit | units | mta-fleet /s | Postfix /s | ratio "
           "| mta CPU ms/unit | Postfix CPU ms/unit | CPU ratio (Postfix/mta) "
           "| mta loss / dup | Postfix loss / dup | sink transactions mta / Postfix "
           "| checks |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        mta_all = results.get((mta_row(row), "mta"), [])
        pf_all = results.get((row, "postfix"), [])
        mta, pf = _chosen(mta_all), _chosen(pf_all)
        good_mta, good_pf = [r for r in mta if r.ok], [r for r in pf if r.ok]
        rate = _median([r.rate for r in good_mta])
        pf_rate = _median([r.rate for r in good_pf])
        cpu = _median([r.cpu_s_per_unit for r in good_mta])
        pf_cpu = _median([r.cpu_s_per_unit for r in good_pf])
        ratio = f"{rate / pf_rate:.2f}x" if rate and pf_rate else "n/a"
        cpu_ratio = f"{pf_cpu / cpu:.2f}x" if cpu and pf_cpu else "n/a"
        unit = next((r.unit for r in [*mta, *pf] if r.unit != "-"), "-")
        units = next((r.units for r in [*mta, *pf] if r.units), 0)

        def loss_dup(runs: list[SideRun]) -> str:
            return (f"{max(r.loss for r in runs)} / {max(r.duplicates for r in runs)}"
                    if runs else "n/a")

        def sinks(runs: list[SideRun]) -> str:
            value = _median([float(r.sink_transactions) for r in runs])
            return _num(value)

        failed = [f"{side} {sum(not r.ok for r, _ in all_)} of {len(all_)} FAILED"
                  for side, all_ in (("mta", mta_all), ("Postfix", pf_all))
                  if any(not r.ok for r, _ in all_)]
        out.append(
            f"| {row} | {unit} | {units:,} | {_num(rate)} | {_num(pf_rate)} | {ratio} | "
            f"{_num(cpu * 1000 if cpu else None, 3)} | "
            f"{_num(pf_cpu * 1000 if pf_cpu else None, 3)} | {cpu_ratio} | "
            f"{loss_dup(mta)} | {loss_dup(pf)} | {sinks(mta)} / {sinks(pf)} | "
            f"{'; '.join(failed) or 'ok'} |")
    return out


def probe_table(results: dict[tuple[str, str], list[tuple[SideRun, bool]]]) -> list[str]:
    """Median ms per command of the probe session while ``postfix-client`` ran."""
    lines = ["| side | " + " | ".join(PROBE_COMMANDS) + " | transactions (under load) |",
             "|---|" + "---|" * (len(PROBE_COMMANDS) + 1)]
    for side in ("mta", "postfix"):
        probes = [r.detail["probe"] for r in _chosen(results.get(("postfix-client", side), []))
                  if r.ok and "probe" in r.detail and r.detail["probe"]["median_ms"]]
        if not probes:
            continue
        cells = [_num(_median([p["median_ms"][c] for p in probes]), 2) for c in PROBE_COMMANDS]
        counts = ", ".join(f"{p['transactions']} ({p['under_load']})" for p in probes)
        lines.append(f"| {side} | " + " | ".join(cells) + f" | {counts} |")
    return lines if len(lines) > 2 else []


def main(argv: list[str] | None = None) -> None:
    """CLI: run the chosen workloads on both sides, JSON lines, then the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--workload", action="append", choices=NAMES)
    parser.add_argument("--side", choices=["mta", "postfix", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; medians")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="node processes (default: one per core, as bench.relay)")
    bench_intake.add_split_argument(parser)
    parser.add_argument("--newsletter-postfix", choices=["nexthop", "per-domain", "both"],
                        default="both", help="the newsletter's Postfix routing (see README)")
    parser.add_argument("--min-idle", type=float, default=0.9, help="CPU idle share to wait for")
    parser.add_argument("--idle-timeout", type=float, help="max wait per run, s "
                        "(default 300, --quick 15)")
    parser.add_argument("--max-other-cpu", type=float, default=0.05,
                        help="rerun a run when other programs used more of the machine")
    parser.add_argument("--attempts", type=int, help="max tries per run (default 2, --quick 1)")
    args = parser.parse_args(argv)
    bench_intake.apply_split(parser, args)
    args.idle_timeout = args.idle_timeout or (15.0 if args.quick else 300.0)
    args.attempts = args.attempts or (1 if args.quick else 2)
    if os.geteuid() != 0:
        parser.error("run as root (private Postfix instances and smtp-sink -u need it)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # so teardown runs on kill
    sizes = QUICK if args.quick else FULL
    modes = ["nexthop", "per-domain"] if args.newsletter_postfix == "both" \
        else [args.newsletter_postfix]
    sides = ("mta", "postfix") if args.side == "both" else (args.side,)
    results: dict[tuple[str, str], list[tuple[SideRun, bool]]] = {}
    rows: list[str] = []
    for name in [n for n in NAMES if not args.workload or n in args.workload]:
        runs = [r for r in plan(name, sizes, args.processes, modes) if r[1] in sides]
        for row, _, _ in runs:
            if row not in rows:
                rows.append(row)
        for _ in range(args.repeat):
            for row, side, run in runs:
                results.setdefault((row, side), []).extend(attempts(row, side, run, args))

    def mta_row(row: str) -> str:
        return row.split(" (", 1)[0]

    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, {platform.platform()}; "
          f"{'quick (smoke) sizes' if args.quick else 'full sizes'}: {asdict(sizes)}; "
          f"node processes: {args.split or args.processes}; repeat: {args.repeat} "
          f"(medians of the clean runs that passed); code: {code_version()}\n")
    print("\n".join(table(rows, results, mta_row)))
    probes = probe_table(results)
    if probes:
        print("\nPer-command latency of one probe session during postfix-client, median ms:\n")
        print("\n".join(probes))
    failed = any(not r.ok for runs in results.values() for r, _ in runs)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
