"""``mta fleet audit`` (every fleet and node action, merged) and ``mta fleet config-check``
(the connection budget summed per database server, DESIGN.md I6)."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mta.cli.common import console, fail, print_rows
from mta.cli.fleet_common import (
    DEFAULT_DATA_DIR,
    DataDirOption,
    FleetOption,
    JsonOption,
    fleet_app,
    inventory,
)
from mta.errors import ConfigError, MtaError
from mta.fleet.audit import AuditEntry, FleetAudit
from mta.fleet.audit_merge import merge_node_records
from mta.fleet.budget import GroupVerdict, check_fleet
from mta.fleet.inventory import Fleet, duration_seconds
from mta.fleet.stores import open_node_store
from mta.queue.records import AuditRecord
from mta.queue.server import STORE_ERRORS

#: Why a node's store could not be read: it is then skipped, with one line.
_NODE_ERRORS: tuple[type[BaseException], ...] = (MtaError, *STORE_ERRORS)
AUDIT_COLUMNS = ["time", "node", "source", "action", "operator", "reason", "result", "counts"]

NodeFilter = Annotated[str | None, typer.Option("--node", "-n", help="Only this node.")]
SinceOption = Annotated[
    str | None,
    typer.Option("--since", help="ISO 8601 time, or a duration back from now: 30m, 2h, 7d."),
]
LimitOption = Annotated[int, typer.Option("--limit", min=1, help="At most this many records.")]


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: an ISO 8601 time (local time when it names no zone) or a duration such
    as ``30m``, ``2h``, ``7d`` before ``now``; ``ValueError`` otherwise."""
    try:
        return now - timedelta(seconds=duration_seconds(text))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: expected an ISO 8601 time or a duration like 30m, 2h, "
                         f"7d, got {text!r}") from None
    return when if when.tzinfo is not None else when.astimezone()


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(counts.items()))


def _entry_json(entry: AuditEntry) -> dict[str, object]:
    record = entry.record
    return {"time": record.at.astimezone(UTC).isoformat(), "node": record.node,
            "source": entry.source, "action": record.action, "operator": record.operator,
            "reason": record.reason, "result": record.result, "counts": dict(record.counts)}


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _gather_audit(fleet: Fleet, data_dir: Path, node: str | None,
                        since: datetime | None, limit: int) -> tuple[list[AuditEntry], int]:
    """The fleet database's, the spool's and every node's records, each action once (a
    fleet command's node record merged into its fleet record); and how many sources (the
    fleet database and the node stores) could be read."""
    read = 0
    node_records: list[AuditRecord] = []
    async with FleetAudit.opened(fleet, data_dir) as audit:
        entries = await audit.records(node, since, limit)
        why = audit.unreachable()
        if why is None:
            read += 1
        else:
            print(f"mta: fleet database unreachable ({why}); listing its spool "
                  f"{audit.spool_path} instead", file=sys.stderr)
    for entry in fleet.nodes:
        if node is not None and entry.name != node:
            continue
        try:
            async with open_node_store(entry) as opened:
                records = await opened.store.audit_records(limit, since)
        except _NODE_ERRORS as exc:
            print(f"mta: node {entry.name}: store unreachable, skipped ({_why(exc)})",
                  file=sys.stderr)
            continue
        read += 1
        node_records += records
    return merge_node_records(entries, node_records)[:limit], read


@fleet_app.command("audit")
def audit(node: NodeFilter = None, since: SinceOption = None, limit: LimitOption = 200,
          as_json: JsonOption = False, fleet_path: FleetOption = None,
          data_dir: DataDirOption = DEFAULT_DATA_DIR) -> None:
    """Every action: the fleet database's, its spool's and each node's own records (a
    fleet action the node also recorded is one row, from fleet+node or spool+node)."""
    try:
        when = parse_since(since, datetime.now(UTC)) if since is not None else None
    except ValueError as exc:
        fail(str(exc))
    fleet = inventory(fleet_path)
    if node is not None:
        try:
            fleet.node(node)
        except ConfigError as exc:
            fail(str(exc))
    entries, read = asyncio.run(_gather_audit(fleet, data_dir, node, when, limit))
    if as_json:
        print(json.dumps([_entry_json(entry) for entry in entries], indent=2))
    else:
        rows = [[e.record.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"), e.record.node,
                 e.source, e.record.action, e.record.operator, e.record.reason,
                 e.record.result, _counts_text(dict(e.record.counts))] for e in entries]
        print_rows("fleet audit, newest first", AUDIT_COLUMNS, rows)
    if read == 0:
        fail("nothing could be read: neither the fleet database nor any node's store "
             "answered", code=1)


def _group_table(verdict: GroupVerdict) -> Table:
    group = verdict.group
    table = Table("node", "processes", "pool", "total", title=f"database {group.label}")
    for node in group.nodes:
        if node.total is None:
            table.add_row(node.node, "?", "?", "? (no config in fleet.toml)")
        else:
            table.add_row(node.node, str(node.processes), str(node.pool), str(node.total))
    table.add_row("all", "", "", str(group.total))
    return table


def _verdict_line(verdict: GroupVerdict) -> str:
    group, limits = verdict.group, verdict.limits
    names = ", ".join(node.node for node in group.nodes)
    if verdict.unreachable is not None:
        return f"database {group.label}: unreachable ({verdict.unreachable}); not checked"
    assert limits is not None
    figures = (f"max_connections {limits.max_connections} - superuser_reserved_connections "
               f"{limits.superuser_reserved} - reserve {group.reserve} = "
               f"{verdict.available} available")
    in_use = ("" if group.embedded_max_connections is not None
              else f"; {limits.in_use} in use now (information only)")
    if group.uncounted:
        return (f"database {group.label}: cannot be checked: {', '.join(group.uncounted)} "
                f"known only by a store DSN; give its config in fleet.toml ({figures})")
    verb = "fits" if verdict.fits else "EXCEEDS"
    return (f"database {group.label}: nodes {names} need {group.total} connections, "
            f"{verb} {figures}{in_use}")


def _show_budget(verdicts: list[GroupVerdict]) -> None:
    for verdict in verdicts:
        if console.is_terminal:
            console.print(_group_table(verdict))
        else:
            print_rows(f"database {verdict.group.label}", ["node", "processes", "pool", "total"],
                       [[n.node, str(n.processes or "?"), str(n.pool or "?"),
                         str(n.total or "?")] for n in verdict.group.nodes])
        print(_verdict_line(verdict))


@fleet_app.command("config-check")
def config_check(fleet_path: FleetOption = None) -> None:
    """The connection budget summed over the nodes that share a database server (I6)."""
    fleet = inventory(fleet_path)
    try:
        verdicts = asyncio.run(check_fleet(fleet))
    except ConfigError as exc:
        fail(f"fleet: {exc}")
    _show_budget(verdicts)
    over = [v for v in verdicts if v.fits is False]
    uncounted = [name for v in verdicts for name in v.group.uncounted]
    unreachable = [v for v in verdicts if v.unreachable is not None]
    if over:
        fail("; ".join(f"connection budget of {', '.join(n.node for n in v.group.nodes)} "
                       f"on {v.group.label}: {v.group.total} exceeds {v.available} available"
                       for v in over)
             + "; lower node.workers, node.intake_db_slots or node.processes")
    if uncounted:
        fail(f"cannot count {', '.join(uncounted)}: known only by a store DSN; give each "
             "its config (config = \"/etc/mta/node.toml\") in fleet.toml")
    if unreachable:
        fail("; ".join(f"database {v.group.label} unreachable: {v.unreachable}"
                       for v in unreachable), code=1)
    print("connection budget fits on every database server")
