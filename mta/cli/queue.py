"""``mta queue``: what state is my mail in, and the operator's audited resolutions."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from mta.cli.common import ConfigOption, console, fail, load, operator_name, print_rows
from mta.config import Settings
from mta.errors import StoreUnavailable
from mta.mail.text import outside_text
from mta.queue import Store
from mta.queue.ids import parse_queue_id, queue_id
from mta.queue.records import (
    DeliveryEvent,
    DeliveryListing,
    DeliveryRecord,
    MessageRecord,
)

queue_app = typer.Typer(no_args_is_help=True,
                        help="Inspect the queue and resolve deliveries (every change is audited).")
T = TypeVar("T")
#: Characters of a set-aside record's raw evidence shown in the listing.
RAW_SHOWN = 2000

ReasonOption = Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit).")]
OperatorOption = Annotated[
    str | None, typer.Option("--operator", help="Who (default: the login name).")
]
LimitOption = Annotated[int, typer.Option("--limit", min=1, help="List at most this many.")]
IdsArgument = Annotated[list[int], typer.Argument(help="Delivery ids (from the listings).")]


def _run(config: Path | None, action: Callable[[Store], Awaitable[T]]) -> T:
    """Open the node's store (starting its embedded server if it has one) and run
    ``action``. Never creates a store and never changes its schema: a data directory
    without one, or a schema this version does not know yet, is an error that names the
    config and store it looked at."""
    from mta.supervisor import embedded_server, existing_store

    settings = load(config)
    where = _where(config, settings)
    if not settings.database.dsn and not embedded_server(settings).initialised():
        fail(f"no store here: {where} holds no node's embedded store "
             "(pass the node's --config)")

    async def main() -> T:
        async with existing_store(settings) as dsn:
            store = await Store.open(dsn, settings)
            try:
                return await action(store)
            finally:
                await store.close()

    try:
        return asyncio.run(main())
    except StoreUnavailable as exc:
        fail(f"{str(exc).splitlines()[0]} ({where})", code=1)


def _where(config: Path | None, settings: Settings) -> str:
    """Which config and store a command looked at, for its output."""
    source = f"config {config}" if config is not None else "no --config"
    store = ("database " + settings.database.dsn.rpartition("@")[2] if settings.database.dsn
             else f"data_dir {Path(settings.node.data_dir).resolve()}")
    return f"{source}, {store}"


def _say_where(config: Path | None) -> None:
    """Name the config and store a listing read, on stderr (stdout stays the listing)."""
    print(f"read: {_where(config, load(config))}", file=sys.stderr)


def _print_listing(title: str, rows: Sequence[DeliveryListing], *, reason: bool) -> None:
    """Deliveries with their last evidence (see :func:`_print_rows`)."""
    header = ["delivery", "queue_id", "from", "to", "attempts", "last_evidence",
              *(["hold_reason"] if reason else []), "since"]
    lines = []
    for row in rows:
        evidence = f"{row.last_reply_code or ''} {row.last_reply or ''}".strip()
        lines.append([str(row.id), queue_id(row.message_id), row.mail_from or "<>",
                      row.recipient, str(row.attempts), evidence or "-",
                      *([row.hold_reason or "-"] if reason else []),
                      row.updated_at.isoformat(timespec="seconds")])
    print_rows(title, header, lines)


@queue_app.command("uncertain")
def list_uncertain(config: ConfigOption = None, limit: LimitOption = 1000) -> None:
    """Deliveries whose data may have reached the remote server without a recorded reply."""
    rows = _run(config, lambda store: store.deliveries_in_state("uncertain", limit))
    _print_listing(f"{len(rows)} uncertain", rows, reason=False)
    _say_where(config)


@queue_app.command("held")
def list_held(config: ConfigOption = None, limit: LimitOption = 1000) -> None:
    """Deliveries held by an operator or by the crash-loop breaker."""
    rows = _run(config, lambda store: store.deliveries_in_state("held", limit))
    _print_listing(f"{len(rows)} held", rows, reason=True)
    _say_where(config)


@queue_app.command("audit")
def list_audit(config: ConfigOption = None, limit: LimitOption = 1000) -> None:
    """The node's audit trail, newest first: every operator action on this store."""
    rows = _run(config, lambda store: store.audit_records(limit))
    lines = [[str(row.id), row.at.isoformat(timespec="seconds"), row.node, row.operator,
              row.action, row.reason, ",".join(map(str, row.requested)),
              ",".join(map(str, row.changed)) or "-"] for row in rows]
    print_rows(f"{len(rows)} audit records",
                ["id", "at", "node", "operator", "action", "reason", "requested", "changed"],
                lines)
    _say_where(config)


@queue_app.command("set-aside")
def list_set_aside(config: ConfigOption = None, limit: LimitOption = 1000) -> None:
    """Records the store refused (DESIGN.md I3b), with their raw evidence, newest first;
    their deliveries are uncertain."""
    rows = _run(config, lambda store: store.set_aside_records(limit))
    lines = [[str(row.id), row.at.isoformat(timespec="seconds"), row.source, row.owner,
              row.attempt_id, ",".join(str(i) for i in row.delivery_ids), row.reason,
              outside_text(row.raw, limit=RAW_SHOWN)] for row in rows]
    print_rows(f"{len(rows)} set aside",
                ["id", "at", "source", "owner", "attempt", "deliveries", "reason", "raw"], lines)
    _say_where(config)


def _resolve(config: Path | None, ids: list[int], verb: str, state: str,
             act: Callable[[Store, list[int]], Awaitable[set[int]]]) -> None:
    changed = _run(config, lambda store: act(store, ids))
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


@queue_app.command("release")
def release(ids: IdsArgument, reason: ReasonOption, config: ConfigOption = None,
            operator: OperatorOption = None) -> None:
    """Put held deliveries back in the queue."""
    who = operator_name(operator)
    _resolve(config, ids, "released", "held",
             lambda store, chosen: store.release_held(chosen, who, reason))


@queue_app.command("show")
def show(message: Annotated[str, typer.Argument(help="Queue id from the 250 reply.")],
         config: ConfigOption = None) -> None:
    """One message's envelope, its deliveries and each delivery's evidence timeline."""
    try:
        message_id = parse_queue_id(message)
    except ValueError:
        fail(f"not a queue id: {message!r}")

    async def gather(store: Store) -> tuple[MessageRecord | None,
                                            list[tuple[DeliveryRecord, list[DeliveryEvent]]]]:
        record = await store.message(message_id)
        deliveries = await store.deliveries(message_id)
        return record, [(d, await store.delivery_events(d.id)) for d in deliveries]

    record, deliveries = _run(config, gather)
    if record is None:
        fail(f"no message {message} in this node's store")
    console.print(f"message {queue_id(record.id)}  from <{record.mail_from}>  "
                  f"{record.size_bytes} bytes  received {record.received_at.isoformat()}  "
                  f"client {record.client_address}  Message-ID {record.message_id_header or '-'}")
    if record.origin_node is not None and record.origin_message is not None:
        console.print(f"  rerouted from {record.origin_node} "
                      f"({queue_id(record.origin_message)})")
    for delivery, events in deliveries:
        flags = " possible_duplicate" if delivery.possible_duplicate else ""
        console.print(f"  delivery {delivery.id} <{delivery.recipient}>: {delivery.state}, "
                      f"{delivery.attempts} attempt(s){flags}{_handoff(delivery)}")
        for event in events:
            code = f" {event.reply_code}" if event.reply_code is not None else ""
            console.print(f"    {event.at.isoformat(timespec='seconds')} {event.state}{code} "
                          f"by {event.actor}: {event.detail}")


def _handoff(delivery: DeliveryRecord) -> str:
    """Where a reroute took (or is taking) ``delivery``, for ``show``."""
    if delivery.reroute_target is None:
        return ""
    if delivery.rerouted_to_message is None:
        return f", in handoff to {delivery.reroute_target}"
    return f", rerouted to {delivery.reroute_target} as {queue_id(delivery.rerouted_to_message)}"
