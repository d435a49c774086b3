"""A Postgres server of a test's own, for tests that stop, freeze or kill it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from mta.queue import EmbeddedPostgres, EmbeddedServerSettings, migrate_dsn

DATABASE = "mta"


@contextlib.asynccontextmanager
async def own_postgres(base_dir: Path, settings: EmbeddedServerSettings | None = None
                       ) -> AsyncIterator[EmbeddedPostgres]:
    """An embedded server in ``base_dir`` with a migrated database ``mta``, removed after."""
    server = EmbeddedPostgres(base_dir, settings)
    await asyncio.to_thread(server.start)
    try:
        conn = await asyncpg.connect(server.dsn, timeout=10)
        try:
            await conn.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await conn.close()
        await migrate_dsn(server.dsn_for(DATABASE))
        yield server
    finally:
        signal_server(server, signal.SIGCONT)
        await asyncio.to_thread(server.remove)


def server_pids(server: EmbeddedPostgres) -> list[int]:
    """The postmaster and its backends, if the server runs."""
    postmaster = server.postmaster_pid()
    if postmaster is None:
        return []
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text(encoding="ascii")
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(entry.name))
    return pids


def signal_server(server: EmbeddedPostgres, signum: int) -> None:
    """Send ``signum`` to the postmaster and every backend (SIGSTOP freezes the server)."""
    for pid in server_pids(server):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
