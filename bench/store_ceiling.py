"""The store's own ceiling: durable inserts of message rows with no SMTP in front.

Runs the store's ``message_insert`` statement (one message, one delivery) from C
concurrent connections into a fresh embedded PostgreSQL, for bodies of 1 KiB and 1 MiB,
and reports inserts/s and the bytes the machine wrote meanwhile (/proc/diskstats), so
the cost of writing each body twice (WAL, then the table) is visible.

    python -m bench.store_ceiling
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg

from mta.queue import EmbeddedPostgres, migrate_dsn
from mta.queue.ids import new_message_id
from mta.queue.sql import query

SECTOR = 512


def disk_bytes_written() -> int:
    """Bytes written to all whole disks so far (partitions are skipped)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        name = fields[2]
        if name.startswith(("loop", "ram")) or (name[-1].isdigit() and not name.startswith("nvme")):
            continue
        total += int(fields[9]) * SECTOR
    return total


async def insert_rate(dsn: str, body_size: int, count: int, connections: int) -> str:
    """Insert ``count`` messages of ``body_size`` over ``connections``; one Markdown row."""
    body = (b"x" * 78 + b"\r\n") * (body_size // 80) + b"y" * (body_size % 80)
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    statement = query("message_insert")
    remaining = iter(range(count))

    async def worker() -> None:
        async with pool.acquire() as conn:
            for _ in remaining:
                await conn.execute(statement, new_message_id(), "s@bench.example",
                                   len(body), b"", body, "127.0.0.1", "bench", None, None,
                                   ["r@bench.example"], ["bench.example"])

    written = disk_bytes_written()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    seconds = time.perf_counter() - started
    written = disk_bytes_written() - written
    await pool.close()
    return (f"| {body_size:,} | {connections} | {count / seconds:,.0f} | "
            f"{written / count / body_size:.2f} | {written / seconds / 1e6:,.0f} |")


async def _main(connections: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="mta-store-bench-"))
    server = EmbeddedPostgres(base)
    dsn = server.start()
    try:
        await migrate_dsn(dsn)
        print("| body bytes | connections | inserts/s | disk bytes written per body byte "
              "| disk MB/s |")
        print("|---|---|---|---|---|")
        print(await insert_rate(dsn, 1024, 10_000, connections), flush=True)
        print(await insert_rate(dsn, 1 << 20, 600, connections), flush=True)
    finally:
        server.remove()


def main(argv: list[str] | None = None) -> None:
    """Measure the store's insert ceiling."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.connections))


if __name__ == "__main__":
    main()
