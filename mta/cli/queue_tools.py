"""``mta queue summary`` (Postfix's qshape) and ``mta queue list``: the node's backlog."""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise
from typing import Annotated, Literal

import typer

from mta.cli.common import ConfigOption
from mta.cli.queue_common import (
    DestinationOption,
    JsonOption,
    LimitOption,
    OlderOption,
    SenderOption,
    StateOption,
    make_filter,
    print_json,
    print_table,
    run_store,
    say_where,
)
from mta.queue.ids import queue_id
from mta.queue.records import PENDING_STATES, QueueGroup
from mta.queue.store_queue import AGE_BOUNDS_MIN

ByOption = Annotated[Literal["destination", "state", "age"], typer.Option(
    "--by", help="Rows by destination (columns: age buckets), state, or age (columns: states).")]
#: The age buckets' names, youngest first (minutes since the message arrived).
BUCKETS = [f"<{AGE_BOUNDS_MIN[0]}m",
           *(f"{a}-{b}m" for a, b in pairwise(AGE_BOUNDS_MIN)),
           f"{AGE_BOUNDS_MIN[-1]}m+"]


def summary(by: ByOption = "destination", as_json: JsonOption = False,
            config: ConfigOption = None) -> None:
    """Deliveries with work left, with bytes, by destination, state or message age."""
    groups = run_store(config, lambda store: store.queue_summary())
    columns = PENDING_STATES if by == "age" else BUCKETS
    rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for group in groups:
        key = _key(group, by)
        column = group.state if by == "age" else BUCKETS[group.bucket]
        rows[key][column] += group.count
        rows[key]["count"] += group.count
        rows[key]["bytes"] += group.bytes
    order = (BUCKETS if by == "age" else PENDING_STATES if by == "state"
             else sorted(rows, key=lambda k: (-rows[k]["count"], k)))
    keys = [k for k in order if k in rows]
    total = sum(g.count for g in groups)
    if as_json:
        print_json({"by": by, "columns": list(columns), "age_bounds_minutes":
                    list(AGE_BOUNDS_MIN), "total": total,
                    "bytes": sum(g.bytes for g in groups),
                    "rows": [{"key": k, **rows[k]} for k in keys], "groups": groups})
    else:
        lines = [[k, str(rows[k]["count"]), str(rows[k]["bytes"]),
                  *(str(rows[k][c]) for c in columns)] for k in keys]
        print_table(f"{total} deliveries with work left, by {by}",
                    [by, "count", "bytes", *columns], lines)
    say_where(config)


def _key(group: QueueGroup, by: str) -> str:
    """The row ``group`` counts in."""
    return {"destination": group.next_hop, "state": group.state,
            "age": BUCKETS[group.bucket]}[by]


def list_deliveries(state: StateOption = None, destination: DestinationOption = None,
                    older_than: OlderOption = None, sender: SenderOption = None,
                    limit: LimitOption = 1000, as_json: JsonOption = False,
                    config: ConfigOption = None) -> None:
    """Deliveries matching a filter (default: all with work left), oldest message first."""
    chosen = make_filter(state, destination, older_than, sender)
    rows = run_store(config, lambda store: store.filter_deliveries(chosen, limit))
    if as_json:
        print_json({"deliveries": rows})
    else:
        lines = [[str(r.id), queue_id(r.message_id), r.state, r.mail_from or "<>", r.recipient,
                  r.next_hop, str(r.attempts),
                  r.received_at.isoformat(timespec="seconds") if r.received_at else "-",
                  r.next_attempt_at.isoformat(timespec="seconds")
                  if r.next_attempt_at and r.state in ("queued", "deferred") else "-",
                  f"{r.last_reply_code or ''} {r.last_reply or ''}".strip() or "-"]
                 for r in rows]
        print_table(f"{len(rows)} deliveries", ["delivery", "queue_id", "state", "from", "to",
                                                "destination", "attempts", "received",
                                                "next_attempt", "last_evidence"], lines)
    say_where(config)
