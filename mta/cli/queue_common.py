"""What the ``mta queue`` modules share: opening the store, filters, tables and JSON."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shlex
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mta.cli.common import console, fail, load
from mta.config import Settings
from mta.errors import StoreUnavailable
from mta.queue import Store
from mta.queue.ids import queue_id
from mta.queue.records import ALL_STATES, PENDING_STATES, DeliveryFilter

T = TypeVar("T")

ReasonOption = Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit).")]
OperatorOption = Annotated[
    str | None, typer.Option("--operator", help="Who (default: the login name).")
]
LimitOption = Annotated[int, typer.Option("--limit", min=1, help="List at most this many.")]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON on standard output.")]
StateOption = Annotated[str | None, typer.Option(
    "--state", help=f"Only deliveries in this state ({', '.join(ALL_STATES)}).")]
DestinationOption = Annotated[str | None, typer.Option(
    "--destination", help="Only deliveries to this next hop (the recipient domain or route).")]
OlderOption = Annotated[str | None, typer.Option(
    "--older-than", help="Only messages received longer ago than this (30m, 2h, 1d).")]
SenderOption = Annotated[str | None, typer.Option(
    "--sender", help="Only messages from this envelope sender ('<>' for the null sender).")]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: Columns that hold ids: never wrapped nor cut short on a narrow terminal.
ID_COLUMNS = frozenset({"id", "delivery", "queue_id", "deliveries", "requested", "changed"})


def run_store(config: Path | None, action: Callable[[Store], Awaitable[T]]) -> T:
    """Open the node's store (starting its embedded server if it has one) and run
    ``action``. Never creates a store and never changes its schema: a data directory
    without one, or a schema this version does not know yet, is an error that names the
    config and store it looked at."""
    from mta.supervisor import embedded_server, existing_store

    settings = load(config)
    where = store_where(config, settings)
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


def store_where(config: Path | None, settings: Settings) -> str:
    """Which config and store a command looked at, for its output."""
    source = f"config {config}" if config is not None else "no --config"
    store = ("database " + settings.database.dsn.rpartition("@")[2] if settings.database.dsn
             else f"data_dir {Path(settings.node.data_dir).resolve()}")
    return f"{source}, {store}"


def say_where(config: Path | None) -> None:
    """Name the config and store a listing read, on stderr (stdout stays the listing)."""
    print(f"read: {store_where(config, load(config))}", file=sys.stderr)


def parse_age(text: str) -> float:
    """Seconds in ``30m``, ``2h``, ``1.5d`` or ``90`` (seconds); exit 2 otherwise."""
    match = _AGE.match(text.strip())
    if match is None:
        fail(f"bad age {text!r}: a number with s, m, h, d or w (like 30m or 2h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_state(text: str, allowed: Sequence[str] = ALL_STATES) -> str:
    """A delivery state among ``allowed``; exit 2 otherwise."""
    if text not in allowed:
        fail(f"bad state {text!r}: one of {', '.join(allowed)}")
    return text


def make_filter(state: str | None, destination: str | None, older_than: str | None,
                sender: str | None, default: Sequence[str] = PENDING_STATES,
                allowed: Sequence[str] = ALL_STATES) -> DeliveryFilter:
    """The filter the options describe (every check exits 2 with one line)."""
    states = (parse_state(state, allowed),) if state is not None else tuple(default)
    return DeliveryFilter(
        states=states, destination=destination.lower() if destination else None,
        older_than_s=parse_age(older_than) if older_than is not None else 0.0,
        sender=None if sender is None else ("" if sender == "<>" else sender))


def filter_text(state: str | None, destination: str | None, older_than: str | None,
                sender: str | None) -> str:
    """The filter options as given (the destination as matched, lower case), in command
    line form: ``--state deferred --destination example.com --older-than 2h``."""
    parts: list[str] = []
    for option, value in (("--state", state),
                          ("--destination", destination.lower() if destination else None),
                          ("--older-than", older_than.strip() if older_than else None),
                          ("--sender", sender)):
        if value is not None:
            parts += [option, shlex.quote(value)]
    return " ".join(parts)


def jsonable(value: Any) -> Any:
    """``value`` with dataclasses, datetimes, UUIDs (as queue ids) and bytes made JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return queue_id(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


def print_json(value: Any) -> None:
    """``value`` as one JSON document on standard output."""
    print(json.dumps(jsonable(value), indent=2, sort_keys=True))


def print_table(title: str, header: list[str], lines: list[list[str]],
                out: Console | None = None) -> None:
    """A table on a terminal, with id columns never wrapped nor cut (others wrap);
    tab-separated lines with a header when piped (for scripts)."""
    out = out or console
    if not out.is_terminal:
        out.file.write(f"# {title}\n")
        for line in [header, *lines]:
            out.file.write("\t".join(field.replace("\t", " ") for field in line) + "\n")
        return
    table = Table(title=title)
    for n, name in enumerate(header):
        if name in ID_COLUMNS:
            widest = max([len(name), *(len(line[n]) for line in lines)])
            table.add_column(name, no_wrap=True, min_width=widest, overflow="ignore")
        else:
            table.add_column(name, overflow="fold")
    for line in lines:
        table.add_row(*line)
    out.print(table)
