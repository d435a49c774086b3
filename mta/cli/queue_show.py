"""``mta queue show``: one message's envelope, headers, deliveries and timelines."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

import typer

from mta.cli.common import ConfigOption, console, fail
from mta.cli.queue_common import JsonOption, print_json, run_store
from mta.mail.text import outside_text
from mta.queue import Store
from mta.queue.body_codec import CorruptBody
from mta.queue.ids import parse_queue_id, queue_id
from mta.queue.records import DeliveryEvent, DeliveryRecord, MessageRecord

#: Bytes of a message read to show its headers (the body is read only with --body).
HEADERS_READ = 65536


@dataclass
class Shown:
    """One message as ``show`` prints it."""

    message: MessageRecord
    headers: str
    deliveries: list[tuple[DeliveryRecord, list[DeliveryEvent]]]
    body: str | None = None


async def _find(store: Store, wanted: str) -> list[uuid.UUID]:
    """Messages ``wanted`` names: a delivery id, a queue id, or a Message-ID."""
    if wanted.isdigit() and len(wanted) < 26:
        found = await store.message_of_delivery(int(wanted))
        return [found] if found is not None else []
    try:
        message_id = parse_queue_id(wanted)
    except ValueError:
        return await store.messages_by_header(wanted)
    return [message_id]


def show(message: Annotated[str, typer.Argument(
             help="A queue id, a delivery id, or a Message-ID (every match is shown).")],
         body: Annotated[bool, typer.Option("--body", help="Show the body too.")] = False,
         as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """One message's envelope, headers, deliveries (next attempt, reroute) and each
    delivery's evidence timeline."""
    if not message.strip():
        fail("give a queue id, a delivery id or a Message-ID")

    async def gather(store: Store) -> list[Shown]:
        shown = []
        for message_id in await _find(store, message.strip()):
            record = await store.message(message_id)
            if record is None:
                continue
            head = await store.message_head(message_id, HEADERS_READ)
            trace, start = head if head is not None else (b"", b"")
            text = trace + start
            end = text.find(b"\r\n\r\n")
            headers = outside_text(text[:end] if end >= 0 else text, limit=HEADERS_READ)
            deliveries = await store.deliveries(message_id)
            shown.append(Shown(record, headers,
                               [(d, await store.delivery_events(d.id)) for d in deliveries],
                               await _body_text(store, message_id) if body else None))
        return shown

    found = run_store(config, gather)
    if not found:
        fail(f"no message {message} in this node's store")
    if as_json:
        print_json({"messages": [
            {"message": s.message, "headers": s.headers, "body": s.body,
             "remote_hosts": _remote_hosts(s),
             "deliveries": [{**_delivery_json(d), "events": events}
                            for d, events in s.deliveries]} for s in found]})
        return
    if len(found) > 1:
        console.print(f"{len(found)} messages match {message}")
    for one in found:
        _print_one(one)


async def _body_text(store: Store, message_id: uuid.UUID) -> str | None:
    """The body as text for a terminal, or why it cannot be shown."""
    try:
        content = await store.message_content(message_id)
    except CorruptBody as exc:
        return f"(the stored body does not decode: {exc})"
    if content is None:
        return None
    return outside_text(content[1], limit=10 * HEADERS_READ * 1024)


def _delivery_json(delivery: DeliveryRecord) -> dict[str, object]:
    return {"id": delivery.id, "recipient": delivery.recipient,
            "destination": delivery.next_hop, "state": delivery.state,
            "attempts": delivery.attempts, "next_attempt_at": delivery.next_attempt_at
            if delivery.state in ("queued", "deferred") else None,
            "last_reply_code": delivery.last_reply_code, "last_reply": delivery.last_reply,
            "possible_duplicate": delivery.possible_duplicate,
            "hold_reason": delivery.hold_reason, "reroute_target": delivery.reroute_target,
            "rerouted_to_message": delivery.rerouted_to_message}


def _print_one(one: Shown) -> None:
    record = one.message
    console.print(f"message {queue_id(record.id)}  from <{record.mail_from}>  "
                  f"{record.size_bytes} bytes  received {record.received_at.isoformat()}  "
                  f"client {record.client_address}  Message-ID {record.message_id_header or '-'}")
    if record.origin_node is not None and record.origin_message is not None:
        console.print(f"  rerouted from {record.origin_node} "
                      f"({queue_id(record.origin_message)})")
    console.print("  headers:")
    for line in one.headers.splitlines():
        console.print(f"    {line}")
    console.print(f"  remote hosts: {', '.join(_remote_hosts(one)) or '-'}")
    for delivery, events in one.deliveries:
        flags = " possible_duplicate" if delivery.possible_duplicate else ""
        due = (f", next attempt {delivery.next_attempt_at.isoformat(timespec='seconds')}"
               if delivery.state in ("queued", "deferred") else "")
        console.print(f"  delivery {delivery.id} <{delivery.recipient}>: {delivery.state}, "
                      f"{delivery.attempts} attempt(s){flags}{due}{_handoff(delivery)}")
        for event in events:
            code = f" {event.reply_code}" if event.reply_code is not None else ""
            host = f" at {event.host}" if event.host else ""
            console.print(f"    {event.at.isoformat(timespec='seconds')} {event.state}{code} "
                          f"by {event.actor}{host}: {event.detail}")
    if one.body is not None:
        console.print("  body:")
        console.print(one.body)


def _remote_hosts(one: Shown) -> list[str]:
    """The remote hosts the message's attempts talked to, in order of first use."""
    hosts = [e.host for _, events in one.deliveries for e in events if e.host]
    return list(dict.fromkeys(hosts))


def _handoff(delivery: DeliveryRecord) -> str:
    """Where a reroute took (or is taking) ``delivery``, for ``show``."""
    if delivery.reroute_target is None:
        return ""
    if delivery.rerouted_to_message is None:
        return f", in handoff to {delivery.reroute_target}"
    return f", rerouted to {delivery.reroute_target} as {queue_id(delivery.rerouted_to_message)}"
