"""One row per fleet action in ``mta fleet audit``: a fleet command's record and its echo
in the node's audit table share no id, so they are paired by their content."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from mta.fleet.audit import AuditEntry, FleetAction, from_node_record
from mta.mail.text import outside_text
from mta.queue.records import AuditRecord

#: The action a node's own audit table records for a fleet action (DESIGN.md Audit: a
#: fleet command writes both, so ``mta fleet audit`` shows the pair once).
NODE_ECHOES: dict[str, str] = {
    "drain": "mode:draining", "isolate": "mode:isolated", "activate": "mode:active",
    "controller:drain": "mode:draining", "controller:isolate": "mode:isolated",
    "reroute": "reroute", "reconcile": "reconcile"}
#: The controller's reason on the node: its evidence after this prefix.
_CONTROLLER_REASON = "controller: "
#: A node's record and a fleet record of one action are at most this far apart: the node
#: writes first (the mode change, the end of a run), the fleet command after it, on
#: another host's clock.
ECHO_WINDOW = timedelta(minutes=5)


def _outcome(result: str) -> str:
    """``ok`` (``ok via store``, the controller's ``acted via …``), ``partial`` or what
    else the first word of ``result`` says (``failed``, ``dry_run``, held back)."""
    word = result.split(" ", 1)[0].rstrip(":")
    return "ok" if word == "acted" else word


def _same_text(a: str, b: str) -> bool:
    return outside_text(a).strip() == outside_text(b).strip()


def _is_echo(fleet: FleetAction, node: AuditRecord) -> bool:
    """Whether ``node`` is the node's own record of ``fleet`` (the time apart)."""
    if NODE_ECHOES.get(fleet.action) != node.action or fleet.node != node.node:
        return False
    if not _same_text(fleet.operator, node.operator):
        return False
    reason = (_CONTROLLER_REASON + fleet.reason if fleet.action.startswith("controller:")
              else fleet.reason)
    if not _same_text(reason, node.reason):
        return False
    if _outcome(fleet.result) not in ("ok", "partial") or (
            _outcome(fleet.result) != _outcome(node.result)):
        return False
    return all(node.counts[key] == value for key, value in fleet.counts.items()
               if key in node.counts)


def merge_node_records(entries: list[AuditEntry],
                       node_records: list[AuditRecord]) -> list[AuditEntry]:
    """The fleet database's and the spool's ``entries`` with every node's records, each
    action once, newest first. A fleet command's action is in both places (a record in
    the fleet database or its spool, and one in the node's audit table); they share no
    id, so a node record is the fleet record's when it names the same node, operator,
    reason (the controller's with its ``controller: `` prefix), the node-side action of
    the fleet action (``drain`` is ``mode:draining``), the same outcome and the same
    counts, within :data:`ECHO_WINDOW`. Such a pair is listed once, as the fleet's
    record with the node's extra counts, from ``fleet+node`` (or ``spool+node``). Each
    record pairs at most once, nearest in time first. Node-only actions (``mta queue
    hold``, a mode the node's own admin API took) stay as they are."""
    candidates: list[tuple[timedelta, int, int]] = []
    by_key: dict[tuple[str, str], list[int]] = {}
    for n, record in enumerate(node_records):
        by_key.setdefault((record.node, record.action), []).append(n)
    for f, entry in enumerate(entries):
        echo = NODE_ECHOES.get(entry.record.action)
        for n in by_key.get((entry.record.node, echo), []) if echo else []:
            apart = abs(entry.record.at - node_records[n].at)
            if apart <= ECHO_WINDOW and _is_echo(entry.record, node_records[n]):
                candidates.append((apart, f, n))
    paired: dict[int, int] = {}
    taken: set[int] = set()
    for _, f, n in sorted(candidates):
        if f not in paired and n not in taken:
            paired[f] = n
            taken.add(n)
    merged = []
    for f, entry in enumerate(entries):
        if f not in paired:
            merged.append(entry)
            continue
        extra = node_records[paired[f]].counts
        both = replace(entry.record, counts={**extra, **entry.record.counts})
        merged.append(AuditEntry(f"{entry.source}+node", both))
    merged += [AuditEntry("node", from_node_record(record))
               for n, record in enumerate(node_records) if n not in taken]
    merged.sort(key=lambda entry: entry.record.at, reverse=True)
    return merged
