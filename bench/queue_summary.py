"""``mta queue summary`` on a big queue: the summary statement on 1,000,000 pending
deliveries beside 1,000,000 delivered ones (history it must not read).

Loads the rows into a fresh embedded PostgreSQL with COPY, VACUUM ANALYZEs, then times
the store's own ``queue_summary`` statement and prints its plan's scans.

    python -m bench.queue_summary                  # 1,000,000 pending, as many delivered
    python -m bench.queue_summary --pending 100000 --history 0
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from mta.queue import EmbeddedPostgres, migrate_dsn
from mta.queue.ids import new_message_id
from mta.queue.sql import query
from mta.queue.store_queue import AGE_BOUNDS_MIN

PER_MESSAGE = 10
RUNS = 5
#: The pending states' shares of the load (out of 100).
STATES = [("queued", 50), ("deferred", 40), ("leased", 4), ("uncertain", 3), ("held", 3)]


def _messages(ids: list[uuid.UUID], done: bool) -> Iterator[tuple[Any, ...]]:
    now = datetime.now(UTC)
    for n, message_id in enumerate(ids):
        received = now - timedelta(seconds=n % 20_000)
        yield (message_id, "s@bench.example", 1000 + n % 5000, b"", b"x", "127.0.0.1", "h",
               None, None, received, now if done else None)


def _deliveries(ids: list[uuid.UUID], rows: int, done: bool) -> Iterator[tuple[Any, ...]]:
    now = datetime.now(UTC)
    cycle = [state for state, share in STATES for _ in range(share)]
    for n in range(rows):
        state = "delivered" if done else cycle[n % 100]
        leased = state == "leased"
        yield (ids[n // PER_MESSAGE], f"r{n}@d{n % 301}.example", f"d{n % 301}.example", state,
               now - timedelta(seconds=n % 86_400), "bench" if leased else None,
               now + timedelta(hours=1) if leased else None)


async def _load(conn: asyncpg.Connection, rows: int, done: bool) -> None:
    ids = [new_message_id() for _ in range((rows + PER_MESSAGE - 1) // PER_MESSAGE)]
    await conn.copy_records_to_table(
        "messages", records=_messages(ids, done),
        columns=["id", "mail_from", "size_bytes", "trace_headers", "body", "client_address",
                 "helo_name", "auth_user", "message_id_header", "received_at", "done_at"])
    await conn.copy_records_to_table(
        "deliveries", records=_deliveries(ids, rows, done),
        columns=["message_id", "recipient", "next_hop", "state", "next_attempt_at",
                 "lease_owner", "lease_expires_at"])


async def summary_time(dsn: str, pending: int, history: int) -> dict[str, Any]:
    """Load the rows and time ``RUNS`` runs of ``queue_summary`` (ms), with its plan."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE messages CASCADE")
        if history:
            await _load(conn, history, done=True)
        await _load(conn, pending, done=False)
        await conn.execute("VACUUM ANALYZE deliveries")
        await conn.execute("VACUUM ANALYZE messages")
        bounds = [float(b) for b in AGE_BOUNDS_MIN]
        statement = await conn.prepare(query("queue_summary"))
        timings, counted = [], 0
        for _ in range(RUNS):
            started = time.perf_counter()
            rows = await statement.fetch(bounds)
            timings.append(time.perf_counter() - started)
            counted = sum(row["count"] for row in rows)
        assert counted == pending, (counted, pending)
        plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + query("queue_summary"), bounds)
    finally:
        await conn.close()
    scans = [row[0].strip() for row in plan if "Scan" in row[0]]
    return {"pending": pending, "history": history, "median_ms": statistics.median(timings)
            * 1000, "max_ms": max(timings) * 1000, "scans": scans}


async def _main(pending: int, history: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="mta-summary-bench-"))
    server = EmbeddedPostgres(base)
    dsn = server.start()
    try:
        await migrate_dsn(dsn)
        result = await summary_time(dsn, pending, history)
        print("| pending deliveries | delivered history | summary median ms | max ms |")
        print("|---|---|---|---|")
        print(f"| {result['pending']:,} | {result['history']:,} | {result['median_ms']:.0f} "
              f"| {result['max_ms']:.0f} |")
        print("\nscans in the plan:")
        for scan in result["scans"]:
            print(f"    {scan}")
    finally:
        server.remove()


def main(argv: list[str] | None = None) -> None:
    """Time the summary at ``--pending`` deliveries beside ``--history`` delivered ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.pending, args.history))


if __name__ == "__main__":
    main()
