"""I6: delivery cannot take intake's connections. Delivery's statements are made slow
(each holds its connection in pg_sleep) with far more sends than ``workers``: intake
still commits within ``acquire_timeout``, and delivery never holds more than ``workers``
connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from mta.config import Settings
from mta.errors import StoreUnavailable
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id
from tests.support.delivery import submit_tagged
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess
from tests.support.sink import Sink

WORKERS = 2
BACKLOG = 60
ACQUIRE_TIMEOUT = 2.0


async def sleeping_connections(dsn: str) -> int:
    """The node's connections inside the fault's pg_sleep right now."""
    return await sleeping_connections_of(dsn, "mta/proc-node")


async def test_a_slow_delivery_never_takes_intakes_connections(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    store = await Store.open(db_dsn, make_settings())
    try:
        for n in range(BACKLOG):
            await store.enqueue(NewMessage(
                id=new_message_id(), mail_from="app@example.org",
                recipients=[f"r{n}@d{n}.example"], trace_headers=b"",
                body=f"Message-ID: <b{n}@test>\r\n\r\nbody\r\n".encode(),
                client_address="127.0.0.1", helo_name="h", auth_user=None,
                message_id_header=f"<b{n}@test>"))
    finally:
        await store.close()
    node = NodeProcess.configure(
        tmp_path / "node", db_dsn, node={"workers": WORKERS, "intake_db_slots": 2},
        database={"acquire_timeout": ACQUIRE_TIMEOUT, "commit_timeout": 10.0},
        delivery={"enabled": True, "poll_interval": 0.2, "batch_size": 20,
                  "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port,
                              "tls": "none"}]})
    node.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_SLOW_AT": "store.delivery_statement",
                "MTA_FAULT_SLOW_S": "3"}
    await node.start()
    try:
        seen: list[int] = []

        async def delivery_share_full() -> bool:
            seen.append(await sleeping_connections(db_dsn))
            return seen[-1] >= WORKERS

        await wait_for(delivery_share_full, timeout=10)
        for n in range(6):
            # A 250 (submit_tagged insists), not the 451 of an intake slot that waited
            # acquire_timeout for a connection delivery held.
            await submit_tagged(node.smtp_port, f"intake{n}", recipients=["x@y.example"])
            seen.append(await sleeping_connections(db_dsn))
        assert max(seen) == WORKERS, seen
    finally:
        await node.close()


async def test_delivery_statements_beyond_their_share_wait_and_intake_commits(
    db_dsn: str, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the store itself: 12 slow delivery statements at once on a pool of six
    (``workers`` 2 + ``intake_db_slots`` 2 + 2): two run, the rest wait for the delivery
    share, and an intake commit takes a connection of its own at once. On one shared
    pool the slow statements would hold all six and the commit would time out."""
    import mta.queue.pool

    settings = make_settings(node={"workers": WORKERS, "intake_db_slots": 2},
                             database={"acquire_timeout": ACQUIRE_TIMEOUT,
                                       "commit_timeout": 10.0})
    store = await Store.open(db_dsn, settings)
    try:
        message_id = new_message_id()
        await store.enqueue(NewMessage(
            id=message_id, mail_from="a@example.org", recipients=["r@example.com"],
            trace_headers=b"", body=b"x\r\n", client_address="127.0.0.1", helo_name="h",
            auth_user=None, message_id_header=None))
        monkeypatch.setattr(mta.queue.pool, "fault_delay",
                            lambda name: 3.0 if name == "store.delivery_statement" else 0.0)
        slow = [asyncio.ensure_future(store.message_content(message_id)) for _ in range(12)]

        async def share_full() -> bool:
            return await sleeping_connections_of(db_dsn, "mta/test-node") >= WORKERS

        await wait_for(share_full, timeout=5)
        await store.enqueue(NewMessage(
            id=new_message_id(), mail_from="a@example.org", recipients=["r@example.com"],
            trace_headers=b"", body=b"y\r\n", client_address="127.0.0.1", helo_name="h",
            auth_user=None, message_id_header=None))
        assert await sleeping_connections_of(db_dsn, "mta/test-node") == WORKERS
        results = await asyncio.gather(*slow, return_exceptions=True)
        assert any(isinstance(r, StoreUnavailable) for r in results), \
            "statements past the share waited at most acquire_timeout"
    finally:
        await store.close()


async def sleeping_connections_of(dsn: str, application: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND query LIKE '%pg_sleep%' AND state = 'active'", application))
    finally:
        await conn.close()
