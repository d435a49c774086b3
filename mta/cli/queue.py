"""``mta queue``: what state is my mail in, and the operator's audited resolutions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from mta.cli.common import ConfigOption, console, fail, operator_name
from mta.cli.queue_actions import delete, hold, release, retry
from mta.cli.queue_common import (
    JsonOption,
    LimitOption,
    OperatorOption,
    ReasonOption,
    print_json,
    print_table,
    run_store,
    say_where,
)
from mta.cli.queue_show import show
from mta.cli.queue_tools import list_deliveries, summary
from mta.mail.text import outside_text
from mta.queue import Store
from mta.queue.ids import queue_id
from mta.queue.records import DeliveryFilter, DeliveryListing

queue_app = typer.Typer(no_args_is_help=True,
                        help="Inspect the queue and resolve deliveries (every change is audited).")
#: Characters of a set-aside record's raw evidence shown in the listing.
RAW_SHOWN = 2000
#: The classifier's words for an attempt whose final dot may have reached the server.
DOT_SENT = "after end of data"

IdsArgument = Annotated[list[int], typer.Argument(help="Delivery ids (from the listings).")]

queue_app.command("summary")(summary)
queue_app.command("list")(list_deliveries)
queue_app.command("show")(show)
queue_app.command("retry")(retry)
queue_app.command("hold")(hold)
queue_app.command("release")(release)
queue_app.command("delete")(delete)


def _print_listing(title: str, rows: Sequence[DeliveryListing], *, reason: bool) -> None:
    """Deliveries with their last evidence (see :func:`print_table`)."""
    header = ["delivery", "queue_id", "from", "to", "attempts", "last_evidence",
              *(["hold_reason"] if reason else []), "since"]
    lines = []
    for row in rows:
        evidence = f"{row.last_reply_code or ''} {row.last_reply or ''}".strip()
        lines.append([str(row.id), queue_id(row.message_id), row.mail_from or "<>",
                      row.recipient, str(row.attempts), evidence or "-",
                      *([row.hold_reason or "-"] if reason else []),
                      row.updated_at.isoformat(timespec="seconds")])
    print_table(title, header, lines)


@queue_app.command("uncertain")
def list_uncertain(config: ConfigOption = None, limit: LimitOption = 1000,
                   as_json: JsonOption = False) -> None:
    """Deliveries whose data may have reached the remote server without a recorded reply,
    with the evidence to choose between ``resend`` and ``mark-delivered``."""
    rows = run_store(config, lambda store: store.filter_deliveries(
        DeliveryFilter(states=("uncertain",)), limit))
    evidence = [_uncertain_evidence(row) for row in rows]
    if as_json:
        print_json({"deliveries": [{**_plain(row), "evidence": e}
                                   for row, e in zip(rows, evidence, strict=True)]})
    else:
        lines = [[str(row.id), queue_id(row.message_id), row.mail_from or "<>", row.recipient,
                  row.next_hop, str(row.attempts), e["remote_host"], e["attempt_started"],
                  e["dot_at"] if e["dot_at"] != "-" else e["dot_written"],
                  e["reply_lost_after"], e["last_evidence"]]
                 for row, e in zip(rows, evidence, strict=True)]
        print_table(f"{len(rows)} uncertain",
                    ["delivery", "queue_id", "from", "to", "destination", "attempts",
                     "remote_host", "attempt_started", "dot_written", "reply_lost_after",
                     "last_evidence"], lines)
    say_where(config)


def _plain(row: DeliveryListing) -> dict[str, object]:
    return {"id": row.id, "queue_id": queue_id(row.message_id), "mail_from": row.mail_from,
            "recipient": row.recipient, "destination": row.next_hop, "state": row.state,
            "attempts": row.attempts, "updated_at": row.updated_at}


def _uncertain_evidence(row: DeliveryListing) -> dict[str, str]:
    """What the store holds to decide on an uncertain delivery; "-" for what it does not
    know (attempts recorded before migration 0015 kept no times)."""
    text = f"{row.last_reply_code or ''} {row.last_reply or ''}".strip()
    dot_written = row.last_dot_at is not None or DOT_SENT in text
    if row.last_dot_at is not None and row.last_reply_lost_at is not None:
        lost_after = f"{(row.last_reply_lost_at - row.last_dot_at).total_seconds():.1f}s"
    elif row.last_dot_at is not None:
        lost_after = "never answered (the process stopped)"
    else:
        lost_after = "-"
    return {"remote_host": row.last_host or "-",
            "attempt_started": _when(row.last_attempt_started_at),
            "dot_written": "yes" if dot_written else "-",
            "dot_at": _when(row.last_dot_at),
            "reply_lost_after": lost_after,
            "recorded_at": _when(row.last_attempt_at), "last_evidence": text or "-"}


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="milliseconds") if at is not None else "-"


@queue_app.command("held")
def list_held(config: ConfigOption = None, limit: LimitOption = 1000,
              as_json: JsonOption = False) -> None:
    """Deliveries held by an operator or by the crash-loop breaker."""
    rows = run_store(config, lambda store: store.deliveries_in_state("held", limit))
    if as_json:
        print_json({"deliveries": rows})
    else:
        _print_listing(f"{len(rows)} held", rows, reason=True)
    say_where(config)


@queue_app.command("audit")
def list_audit(config: ConfigOption = None, limit: LimitOption = 1000,
               as_json: JsonOption = False) -> None:
    """The node's audit trail, newest first: every operator action on this store."""
    rows = run_store(config, lambda store: store.audit_records(limit))
    if as_json:
        print_json({"audit": rows})
        say_where(config)
        return
    lines = [[str(row.id), row.at.isoformat(timespec="seconds"), row.node, row.operator,
              row.action, row.reason, ",".join(map(str, row.requested)),
              ",".join(map(str, row.changed)) or "-"] for row in rows]
    print_table(f"{len(rows)} audit records",
                ["id", "at", "node", "operator", "action", "reason", "requested", "changed"],
                lines)
    say_where(config)


@queue_app.command("set-aside")
def list_set_aside(config: ConfigOption = None, limit: LimitOption = 1000,
                   as_json: JsonOption = False) -> None:
    """Records the store refused (DESIGN.md I3b), with their raw evidence, newest first;
    their deliveries are uncertain."""
    rows = run_store(config, lambda store: store.set_aside_records(limit))
    if as_json:
        print_json({"set_aside": rows})
        say_where(config)
        return
    lines = [[str(row.id), row.at.isoformat(timespec="seconds"), row.source, row.owner,
              row.attempt_id, ",".join(str(i) for i in row.delivery_ids), row.reason,
              outside_text(row.raw, limit=RAW_SHOWN)] for row in rows]
    print_table(f"{len(rows)} set aside",
                ["id", "at", "source", "owner", "attempt", "deliveries", "reason", "raw"], lines)
    say_where(config)


def _resolve(config: Path | None, ids: list[int], verb: str, state: str,
             act: Callable[[Store, list[int]], Awaitable[set[int]]]) -> None:
    changed = run_store(config, lambda store: act(store, ids))
    if changed:
        console.print(f"{verb}: {', '.join(str(i) for i in sorted(changed))}")
    missed = sorted(set(ids) - changed)
    if missed:
        fail(f"not {state}, left unchanged: {', '.join(str(i) for i in missed)}")


@queue_app.command("resend")
def resend(ids: IdsArgument, reason: ReasonOption, config: ConfigOption = None,
           operator: OperatorOption = None) -> None:
    """Send uncertain deliveries again (they are marked possible_duplicate)."""
    who = operator_name(operator)
    _resolve(config, ids, "queued again", "uncertain",
             lambda store, chosen: store.resend_uncertain(chosen, who, reason))


@queue_app.command("mark-delivered")
def mark_delivered(ids: IdsArgument, reason: ReasonOption, config: ConfigOption = None,
                   operator: OperatorOption = None) -> None:
    """Record that uncertain deliveries did arrive (for example, the recipient confirmed)."""
    who = operator_name(operator)
    _resolve(config, ids, "marked delivered", "uncertain",
             lambda store, chosen: store.mark_uncertain_delivered(chosen, who, reason))
