"""``mta fleet``: status, drain | isolate | activate, reroute and reconcile.

The audit and config-check commands live in ``fleet_audit.py``; both register on
``fleet_app`` (``fleet_common.py``). Every action is audited in the fleet database (or
its local spool when that is down) and in the node's own audit table.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

import mta.cli.fleet_audit
import mta.cli.fleet_controller  # noqa: F401  (registers controller)
from mta.cli.common import console, fail, operator_name, print_rows
from mta.cli.fleet_common import (
    DEFAULT_DATA_DIR,
    DataDirOption,
    FleetOption,
    JsonOption,
    NodeArgument,
    OperatorOption,
    ReasonOption,
    fleet_app,
    inventory,
)
from mta.errors import ConfigError, StoreUnavailable
from mta.fleet.inventory import Fleet
from mta.fleet.modes import COMMAND_MODES, ModeChangeFailed, change_mode
from mta.fleet.reroute import Rerouter, RerouteRefused, RerouteReport
from mta.fleet.status import NodeStatus, fleet_status
from mta.fleet.stores import node_settings, open_node_store

__all__ = ["fleet_app"]


def _audit(fleet: Fleet, data_dir: Path, action: str, node: str, operator: str, reason: str,
           result: str, counts: Mapping[str, int] | None = None) -> None:
    """Record an action in the fleet database (or its spool) and say where it went."""
    from mta.fleet.audit import FleetAction, FleetAudit

    async def record() -> str:
        async with FleetAudit.opened(fleet, data_dir) as audit:
            return await audit.record(FleetAction(action, node, operator, reason, result,
                                                  dict(counts or {})))

    where = asyncio.run(record())
    print(f"audited: {action} {node} in the {where}", file=sys.stderr)


@fleet_app.command("status")
def status(fleet_path: FleetOption = None, as_json: JsonOption = False) -> None:
    """Each node's mode, readiness and queue (an unreachable node is a row saying so)."""
    fleet = inventory(fleet_path)
    rows = asyncio.run(fleet_status(fleet))
    if as_json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
        return
    header = ["node", "source", "mode", "ready", "store", "queued", "deferred", "leased",
              "uncertain", "held", "oldest", "delivered/min", "journal", "note"]
    print_rows("Fleet status", header, [_status_line(row) for row in rows])


def _status_line(row: NodeStatus) -> list[str]:
    def shown(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.0f}s"
        return str(value)

    states = [shown(row.by_state.get(state)) for state in
              ("queued", "deferred", "leased", "uncertain", "held")]
    return [row.node, row.source, shown(row.mode), shown(row.ready), shown(row.store_up),
            *states, shown(row.oldest_pending_s), shown(row.delivered_last_minute),
            shown(row.journal_backlog), "; ".join(row.errors) or "-"]


def _mode_command(command: str) -> None:
    mode = COMMAND_MODES[command]

    def run(node: NodeArgument, reason: ReasonOption, operator: OperatorOption = None,
            fleet_path: FleetOption = None, data_dir: DataDirOption = DEFAULT_DATA_DIR) -> None:
        fleet = inventory(fleet_path)
        _node(fleet, node)
        entry = fleet.node(node)
        who = operator_name(operator)
        try:
            change = asyncio.run(change_mode(entry, mode, reason, who))
        except ModeChangeFailed as exc:
            _audit(fleet, data_dir, command, node, who, reason, f"failed: {exc}")
            fail(str(exc), code=1)
        if change.via == "store":
            print(f"{node}: {change.fallback_reason}; wrote the mode into its store instead, "
                  "which the node follows (at once by NOTIFY, else within node.mode_poll; "
                  "a stopped node reads it when it starts)", file=sys.stderr)
        _audit(fleet, data_dir, command, node, who, reason, f"ok via {change.via}")
        print(f"{node}: {change.mode} (via {change.via})")

    run.__doc__ = {
        "drain": "Refuse new mail (421 4.3.2) and deliver what the node holds.",
        "isolate": "Refuse new mail and deliver nothing: its messages stay pending.",
        "activate": "Accept and deliver again (only a person does this, never the controller).",
    }[command]
    fleet_app.command(command)(run)


for _command in COMMAND_MODES:
    _mode_command(_command)


def _node(fleet: Fleet, name: str) -> str:
    """Exit 2 unless ``name`` is in the fleet; returns it."""
    try:
        fleet.node(name)
    except ConfigError as exc:
        fail(f"fleet: {exc}")
    return name


@fleet_app.command("reroute")
def reroute(
    node: NodeArgument,
    to: Annotated[list[str] | None, typer.Option(
        "--to", help="Target node (repeat for several; default: every other node).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would move.")]
        = False,
    batch: Annotated[int, typer.Option("--batch", min=1, max=10_000,
                                       help="Deliveries leased per batch.")] = 500,
    rate: Annotated[float | None, typer.Option(
        "--rate", min=0.1, help="At most this many deliveries per second.")] = None,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit).")]
        = "",
    operator: OperatorOption = None,
    fleet_path: FleetOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Move a draining or isolated node's queued and deferred mail to active nodes."""
    fleet = inventory(fleet_path)
    _node(fleet, node)
    for target in to or []:
        _node(fleet, target)
    who = operator_name(operator)
    why = reason or f"move pending mail off {node}"
    report = _run_reroute(fleet, node, to or [], batch, rate, dry_run, as_json, who, why)
    if dry_run:
        _print_plan(report, as_json)
        return
    _audit(fleet, data_dir, "reroute", node, who, why, report.result, report.counts())
    _print_report(report, as_json)


def _run_reroute(fleet: Fleet, node: str, to: list[str], batch: int, rate: float | None,
                 dry_run: bool, as_json: bool, operator: str, reason: str) -> RerouteReport:
    show = console.is_terminal and not as_json and not dry_run
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  disable=not show) as progress:
        task = progress.add_task(f"reroute {node}", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            rerouter = Rerouter(fleet, node, to, batch=batch, rate=rate, progress=advance,
                                operator=operator, reason=reason)
            return asyncio.run(rerouter.run(dry_run=dry_run))
        except RerouteRefused as exc:
            fail(f"reroute refused: {exc}", code=1)
        except StoreUnavailable as exc:
            fail(f"reroute stopped: {str(exc).splitlines()[0]} (run it again: the next run "
                 "finishes what this one started)", code=1)


def _record_on_node(fleet: Fleet, node: str, action: str, operator: str, reason: str,
                    result: str, counts: Mapping[str, int]) -> None:
    """An action in the node's own audit table too (best effort: the fleet record is
    already written or spooled)."""
    async def record() -> None:
        async with open_node_store(fleet.node(node)) as opened:
            await opened.store.record_audit(action, operator, reason, result, counts)

    try:
        asyncio.run(record())
    except StoreUnavailable as exc:
        print(f"{node}: not in its audit table: {str(exc).splitlines()[0]}", file=sys.stderr)


def _print_plan(report: RerouteReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"source": report.source, "targets": report.plan_targets,
                          "targets_skipped": report.targets_skipped,
                          "would_move": [{"destination": hop, "state": state, "count": n}
                                         for hop, state, n in report.plan]}, indent=2))
        return
    total = sum(n for _, _, n in report.plan)
    print_rows(f"Would move {total} deliveries off {report.source} to "
               f"{', '.join(report.plan_targets) or 'no usable target'}",
               ["destination", "state", "deliveries"],
               [[hop, state, str(n)] for hop, state, n in report.plan])
    for name, why in report.targets_skipped.items():
        print(f"target {name} not used: {why}", file=sys.stderr)


def _print_report(report: RerouteReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"run": report.run, "source": report.source,
                          "moved": report.moved, "moved_total": report.moved_total,
                          "already_moved": report.already_moved, "skipped": report.skipped,
                          "targets_skipped": report.targets_skipped}, indent=2))
        return
    lines = [[name, str(n)] for name, n in report.moved.items()]
    lines.append(["already moved (receipt only)", str(report.already_moved)])
    lines += [[f"skipped: {state}", str(n)] for state, n in report.skipped.items()]
    print_rows(f"Reroute {report.run} off {report.source}: moved {report.moved_total}",
               ["", "deliveries"], lines)
    for name, why in report.targets_skipped.items():
        print(f"target {name} not used: {why}", file=sys.stderr)
    if report.skipped.get("in_handoff"):
        print(f"{report.skipped['in_handoff']} deliveries are still in handoff to a target "
              "that failed: run reroute again once it is back", file=sys.stderr)


@fleet_app.command("reconcile")
def reconcile(node: NodeArgument, reason: ReasonOption = "reconcile after a crash",
              operator: OperatorOption = None, fleet_path: FleetOption = None,
              data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Replay the node's journal against its store: what certainly went, what certainly
    did not (requeued), and what is uncertain. Safe to run twice."""
    fleet = inventory(fleet_path)
    _node(fleet, node)
    who = operator_name(operator)
    answer, via = _reconcile(fleet, node, who, reason)
    counts = {name: len(answer.get(name, [])) for name in
              ("delivered", "not_delivered", "uncertain")}
    _audit(fleet, data_dir, "reconcile", node, who, reason, f"ok via {via}", counts)
    if as_json:
        print(json.dumps({"node": node, "via": via, **answer}, indent=2))
        return
    print(f"{node}: reconciled via {via}"
          + ("" if answer.get("changed") else "; nothing was left to settle"), file=sys.stderr)
    for name, title in (("delivered", "Certainly delivered"),
                        ("not_delivered", "Certainly not delivered"),
                        ("uncertain", "Uncertain (resolve with mta queue)")):
        entries = answer.get(name, [])
        print_rows(f"{title}: {len(entries)}",
                   ["delivery", "queue_id", "to", "state", "how", "evidence"],
                   [[str(e["delivery_id"]), e["queue_id"] or "-", e["recipient"] or "-",
                     e["state"], e.get("how") or "-", e["evidence"]] for e in entries])


def _reconcile(fleet: Fleet, node: str, operator: str,
               reason: str) -> tuple[dict[str, Any], str]:
    """The running daemon's reconcile, or with it down, one from the node's own disk
    (which needs its ``config``: the journal is there)."""
    from mta.fleet.admin_client import AdminClient, AdminRefused, AdminUnreachable
    from mta.supervisor import reconcile_offline

    entry = fleet.node(node)
    try:
        answer = asyncio.run(AdminClient(entry).call(
            "POST", "/v1/reconcile", {"by": operator, "reason": reason}))
        return dict(answer), "admin API"
    except AdminRefused as exc:
        fail(f"{node}: the admin API refused the reconcile: {exc}", code=1)
    except AdminUnreachable as exc:
        down = str(exc)
    if entry.config is None:
        fail(f"{node}: admin API unreachable ({down}); reconciling a stopped node reads its "
             "journal on its own disk, so fleet.toml must give its config (run this on "
             "that host)", code=1)
    try:
        report = asyncio.run(reconcile_offline(node_settings(entry)))
        _record_on_node(fleet, node, "reconcile", operator, reason, "ok offline",
                        report.counts())
    except (StoreUnavailable, ConfigError) as exc:
        fail(f"{node}: cannot reconcile offline: {str(exc).splitlines()[0]}", code=1)
    return report.to_json(), f"its journal on this host (admin API unreachable: {down})"
