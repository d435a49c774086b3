"""The store's own ceiling: durable inserts of message rows with no SMTP in front.

Runs the store's ``message_insert`` statement (one message, one delivery) from C
concurrent connections into a fresh embedded PostgreSQL, then reads every body back with
``message_content`` as delivery does, then forces a checkpoint. It reports inserts/s,
PostgreSQL's CPU per insert and per read (its whole process tree, /proc), and the bytes
the machine wrote per body byte (/proc/diskstats) during the inserts and up to the end
of the checkpoint, so the cost of each server setting and of compressing bodies shows.

    python -m bench.store_ceiling                              # 1 KiB and 1 MiB bodies
    python -m bench.store_ceiling --body realistic --runs 3 \\
        --variant '' --variant wal_init_zero=on --variant wal_compression=pglz \\
        --variant 'max_wal_size=4GB checkpoint_timeout=30min' --variant zstd

A variant is a space-separated list of ``name=value`` server settings over the node's
own (``mta.queue.embedded``), and ``zstd`` compresses each body at level 1 before the
insert (the store's side of compressing bodies in the node, mta.queue.body_codec).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import zstandard

from bench.cpu import cpu_seconds, descendants
from bench.workloads import realistic_message
from mta.queue import EmbeddedPostgres, EmbeddedServerSettings, migrate_dsn
from mta.queue.body_codec import LEVEL
from mta.queue.ids import new_message_id
from mta.queue.sql import query

SECTOR = 512
COUNTS = {1024: 10_000, 1 << 20: 600}


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


@dataclass(frozen=True)
class Variant:
    """Server settings over the node's own, and whether bodies are compressed first."""

    settings: tuple[tuple[str, str], ...]
    zstd: bool

    @classmethod
    def parse(cls, text: str) -> Variant:
        words = text.split()
        settings = []
        for word in words:
            name, equals, value = word.partition("=")
            if word != "zstd" and not (name and equals and value):
                raise SystemExit(f"bad variant {text!r}: expected name=value words or zstd")
            if word != "zstd":
                settings.append((name, value))
        return cls(tuple(settings), "zstd" in words)

    def label(self) -> str:
        words = [f"{name}={value}" for name, value in self.settings]
        return " ".join(words + (["zstd-1 bodies"] if self.zstd else [])) or "node's own"


@dataclass(frozen=True)
class _VariantServer(EmbeddedServerSettings):
    extra: tuple[tuple[str, str], ...] = ()

    def as_options(self) -> list[str]:
        return super().as_options() + [f"-c {name}={value}" for name, value in self.extra]


def _body(kind: str, size: int, zstd: bool) -> bytes:
    body = realistic_message() if kind == "realistic" and size >= 1 << 20 else \
        (b"x" * 78 + b"\r\n") * (size // 80) + b"y" * (size % 80)
    if zstd:
        body = zstandard.ZstdCompressor(level=LEVEL).compress(body)
    return body


async def measure(variant: Variant, kind: str, size: int, count: int,
                  connections: int) -> dict[str, float]:
    """One fresh server: ``count`` inserts, the reads back, a checkpoint."""
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="mta-store-bench-")),
                              _VariantServer(extra=variant.settings))
    dsn = server.start()
    try:
        await migrate_dsn(dsn)
        body = _body(kind, size, variant.zstd)
        encoding = "zstd" if variant.zstd else "identity"
        postmaster = server.postmaster_pid()
        assert postmaster is not None

        def pg_cpu() -> float:
            return cpu_seconds(descendants(postmaster))

        pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
        ids = [new_message_id() for _ in range(count)]

        async def each(statement: str, make_args: Callable[[object], tuple[object, ...]],
                       ) -> None:
            pending = iter(ids)

            async def worker() -> None:
                async with pool.acquire() as conn:
                    for message_id in pending:
                        await conn.execute(statement, *make_args(message_id))

            await asyncio.gather(*(worker() for _ in range(connections)))

        cpu, written, started = pg_cpu(), disk_bytes_written(), time.perf_counter()
        await each(query("message_insert"), lambda i: (
            i, "s@bench.example", len(body), b"", body, "127.0.0.1", "bench", None, None,
            ["r@bench.example"], ["bench.example"], encoding))
        seconds = time.perf_counter() - started
        insert_cpu, insert_written = pg_cpu() - cpu, disk_bytes_written() - written
        cpu = pg_cpu()
        await each(query("message_content"), lambda i: (i,))
        read_cpu = pg_cpu() - cpu
        async with pool.acquire() as conn:
            await conn.execute("CHECKPOINT")
        total_written = disk_bytes_written() - written
        await pool.close()
        return {"rate": count / seconds, "insert_ms": insert_cpu / count * 1e3,
                "read_ms": read_cpu / count * 1e3,
                "disk_insert": insert_written / count / len(body),
                "disk_total": total_written / count / len(body),
                "disk_mb_s": insert_written / seconds / 1e6, "stored": len(body)}
    finally:
        server.remove()


async def _main(args: argparse.Namespace) -> None:
    variants = [Variant.parse(text) for text in args.variant or [""]]
    sizes = [1 << 20] if args.body == "realistic" else sorted(COUNTS)
    print("| body | variant | stored bytes | inserts/s | PG CPU ms/insert | PG CPU ms/read "
          "| disk bytes/body byte (inserts; to checkpoint end) | disk MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for variant in variants:
            runs = [await measure(variant, args.body, size, args.count or COUNTS[size],
                                  args.connections) for _ in range(args.runs)]

            def median(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(run[key] for run in runs)

            print(f"| {args.body} {size:,} | {variant.label()} | {median('stored'):,.0f} "
                  f"| {median('rate'):,.0f} | {median('insert_ms'):.2f} "
                  f"| {median('read_ms'):.2f} | {median('disk_insert'):.2f}; "
                  f"{median('disk_total'):.2f} | {median('disk_mb_s'):,.0f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Measure the store's insert ceiling, per server setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--body", choices=["repeated", "realistic"], default="repeated",
                        help="repeated lines (1 KiB and 1 MiB), or the realistic 1 MiB MIME")
    parser.add_argument("--variant", action="append",
                        help="server settings 'name=value ...' and/or zstd; repeatable")
    parser.add_argument("--runs", type=int, default=1, help="fresh servers per variant; medians")
    parser.add_argument("--count", type=int, help="inserts per run (default 10,000 / 600)")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
