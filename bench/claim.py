"""Claim latency against queue length: the claim must cost the same at 1,000 and 1,000,000.

Loads N due deliveries into a fresh embedded PostgreSQL with COPY, ANALYZEs, then times
the store's own claim statement (``delivery_claim_due``, 50 rows) many times, each in a
transaction that is rolled back so every claim sees the same queue.

    python -m bench.claim                      # 1,000 and 1,000,000 rows
    python -m bench.claim --rows 10000 --rows 1000000
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

PER_MESSAGE = 100
CLAIMS = 300
BATCH = 50


class _Rollback(Exception):
    """Raised to roll a timed claim back."""


def _messages(ids: list[uuid.UUID]) -> Iterator[tuple[Any, ...]]:
    for message_id in ids:
        yield (message_id, "s@bench.example", 10, b"", b"x", "127.0.0.1", "h", None, None)


def _deliveries(ids: list[uuid.UUID], rows: int) -> Iterator[tuple[Any, ...]]:
    now = datetime.now(UTC)
    for n in range(rows):
        yield (ids[n // PER_MESSAGE], f"r{n}@d{n % 101}.example", f"d{n % 101}.example",
               "queued", now - timedelta(seconds=n % 86_400))


async def claim_latency(dsn: str, rows: int) -> dict[str, float]:
    """Load ``rows`` due deliveries and time ``CLAIMS`` claims of ``BATCH`` each (ms)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE messages CASCADE")
        ids = [new_message_id() for _ in range((rows + PER_MESSAGE - 1) // PER_MESSAGE)]
        await conn.copy_records_to_table(
            "messages", records=_messages(ids),
            columns=["id", "mail_from", "size_bytes", "trace_headers", "body", "client_address",
                     "helo_name", "auth_user", "message_id_header"])
        await conn.copy_records_to_table(
            "deliveries", records=_deliveries(ids, rows),
            columns=["message_id", "recipient", "next_hop", "state", "next_attempt_at"])
        await conn.execute("VACUUM ANALYZE deliveries")
        statement = await conn.prepare(query("delivery_claim_due"))
        timings = []
        for i in range(CLAIMS):
            started = time.perf_counter()
            try:
                async with conn.transaction():
                    claimed = await statement.fetch(f"bench-{i}", BATCH, 30.0, [], [])
                    timings.append(time.perf_counter() - started)
                    assert len(claimed) >= BATCH  # plus due siblings at the same next hop
                    raise _Rollback
            except _Rollback:
                pass
    finally:
        await conn.close()
    timings.sort()
    return {"rows": rows, "p50_ms": statistics.median(timings) * 1000,
            "p99_ms": timings[int(len(timings) * 0.99) - 1] * 1000}


async def _main(row_counts: list[int]) -> None:
    base = Path(tempfile.mkdtemp(prefix="mta-claim-bench-"))
    server = EmbeddedPostgres(base)
    dsn = server.start()
    try:
        await migrate_dsn(dsn)
        print("| queued deliveries | claim p50 ms | claim p99 ms |")
        print("|---|---|---|")
        for rows in row_counts:
            result = await claim_latency(dsn, rows)
            print(f"| {rows:,} | {result['p50_ms']:.3f} | {result['p99_ms']:.3f} |", flush=True)
    finally:
        server.remove()


def main(argv: list[str] | None = None) -> None:
    """Time claims at each ``--rows`` size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.rows or [1_000, 1_000_000]))


if __name__ == "__main__":
    main()
