"""The node owns its embedded PostgreSQL: when the server dies (SIGKILL of the
postmaster, as an OOM kill would), the node starts it again, counts it, and intake
recovers with no one's help; on SIGTERM the node stops the server it runs on."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import asyncpg

from mta.queue import EmbeddedPostgres
from tests.support.admin import metric
from tests.support.delivery import submit_tagged
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess

RESTARTS = "mta_embedded_store_restarts_total"


async def test_a_killed_embedded_server_is_restarted_and_intake_recovers(
    tmp_path: Path,
) -> None:
    node = NodeProcess.configure(tmp_path / "node", "", database={"commit_timeout": 3.0})
    await node.start()
    server = EmbeddedPostgres(tmp_path / "node" / "data" / "postgres")
    try:
        await submit_tagged(node.smtp_port, "before")
        first = server.postmaster_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)

        async def restarted() -> bool:
            pid = server.postmaster_pid()
            return pid is not None and pid != first and \
                await metric(node.admin_port, RESTARTS) == 1

        await wait_for(restarted, timeout=60)
        await node.wait_logged("node.embedded_store_restarted")

        async def accepts() -> bool:
            try:
                await submit_tagged(node.smtp_port, "after")
            except AssertionError:  # a 451 while the pool reconnects
                return False
            return True

        await wait_for(accepts, timeout=30)
        node.signal(signal.SIGTERM)
        assert await node.wait_exit(30) == 0
        assert server.postmaster_pid() is None, "the node stopped its server"
    finally:
        await node.close()
        if server.postmaster_pid() is not None:
            server.stop()


async def test_a_server_left_by_a_killed_node_is_adopted_and_stopped_on_sigterm(
    tmp_path: Path,
) -> None:
    node = NodeProcess.configure(tmp_path / "node", "")
    server = EmbeddedPostgres(tmp_path / "node" / "data" / "postgres")
    await node.start()
    try:
        left = server.postmaster_pid()
        node.signal(signal.SIGKILL)
        assert await node.wait_exit(30) == -signal.SIGKILL
        assert server.postmaster_pid() == left, "the server outlived its node"
        await node.start()
        await node.wait_logged("node.embedded_store_adopted")
        await submit_tagged(node.smtp_port, "adopted")
        node.signal(signal.SIGTERM)
        assert await node.wait_exit(30) == 0
        assert server.postmaster_pid() is None, "the adopted server was stopped too"
    finally:
        await node.close()
        if server.postmaster_pid() is not None:
            server.stop()


async def test_the_embedded_server_keeps_durability_and_skips_wal_zero_fill(
    tmp_path: Path,
) -> None:
    """The node's own server commits durably (fsync, synchronous commit, full pages) and
    does not write each new WAL segment full of zeros before using it."""
    node = NodeProcess.configure(tmp_path / "node", "")
    await node.start()
    server = EmbeddedPostgres(tmp_path / "node" / "data" / "postgres")
    try:
        conn = await asyncpg.connect(server.dsn)
        try:
            shown = {name: await conn.fetchval(f"SHOW {name}") for name in (
                "fsync", "synchronous_commit", "full_page_writes", "wal_init_zero")}
        finally:
            await conn.close()
        assert shown == {"fsync": "on", "synchronous_commit": "on",
                         "full_page_writes": "on", "wal_init_zero": "off"}
    finally:
        await node.close()
        if server.postmaster_pid() is not None:
            server.stop()
