"""I1 under crashes: after kill -9 of the node or of Postgres, every 250 is still stored."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mta.config import Settings
from mta.queue.ids import parse_queue_id
from tests.support.admin import metric
from tests.support.mail import Ledger, park_in_data, stored_message_ids, submit_loop
from tests.support.nodes import start_node, wait_for
from tests.support.pg import DATABASE, own_postgres
from tests.support.process import NodeProcess
from tests.support.smtp import RawSMTP

CLIENTS = 6
#: The kill comes right after this many 250s.
KILL_AFTER = 25
#: Each client stops after this many messages, so a test that never kills still ends.
PER_CLIENT_LIMIT = 500
PARKED_ID = "<parked@test.invalid>"


def assert_every_accept_stored(ledger: Ledger, stored: list[tuple[uuid.UUID, str | None]]) -> None:
    """Each 250 is stored once under its queue id; nothing more than was sent is stored."""
    by_id = dict(stored)
    headers = Counter(header for _, header in stored)
    for message_id, qid in ledger.accepted.items():
        uid = parse_queue_id(qid)
        assert uid in by_id, f"{message_id} got 250 as {qid} but is not stored"
        assert by_id[uid] == message_id
        assert headers[message_id] == 1, f"{message_id} stored {headers[message_id]} times"
    assert len(stored) <= ledger.dots_sent, (len(stored), ledger.dots_sent)
    assert PARKED_ID not in headers, "a DATA that never ended must not be stored"


def assert_work_in_flight(ledger: Ledger, at_kill: set[int]) -> None:
    """The kill hit a busy node: 250s answered, and sessions mid-transaction.

    The parked session was mid-DATA by construction (the node reported it in flight
    before the loops began); the looping clients must have been mid-transaction too.
    """
    assert len(ledger.accepted) >= KILL_AFTER
    assert at_kill, "no looping client was mid-transaction at the kill"


async def run_until_killed(port: int, admin_port: int,
                           kill: Callable[[], None]) -> tuple[Ledger, set[int]]:
    """Clients submit in loops with one parked mid-DATA; ``kill`` runs right after a 250.

    Returns the ledger and the looping clients that were mid-transaction at the kill.
    """
    ledger = Ledger()
    killed = asyncio.Event()
    at_kill: set[int] = set()

    def after_accept() -> None:
        if len(ledger.accepted) >= KILL_AFTER and not killed.is_set():
            kill()
            killed.set()
            at_kill.update(ledger.in_flight)

    ledger.on_accept = after_accept
    parked = await park_in_data(port, PARKED_ID)

    async def node_reads_parked_data() -> bool:
        return await metric(admin_port, "mta_intake_data_in_flight") >= 1

    await wait_for(node_reads_parked_data, timeout=10)
    clients = [asyncio.create_task(submit_loop(port, n, ledger, PER_CLIENT_LIMIT, killed))
               for n in range(CLIENTS)]
    try:
        await asyncio.wait_for(killed.wait(), 60)
        await asyncio.wait_for(asyncio.gather(*clients), 60)
    finally:
        for task in clients:
            task.cancel()
        await parked.close()
    return ledger, at_kill


async def test_node_sigkill_loses_no_accepted_message(tmp_path: Path, db_dsn: str) -> None:
    """kill -9 of a node process right after a 250, with other sessions mid-transaction."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn)
    await node.start()
    try:
        ledger, at_kill = await run_until_killed(
            node.smtp_port, node.admin_port, lambda: node.signal(signal.SIGKILL))
        assert await node.wait_exit(10) == -signal.SIGKILL
        assert_work_in_flight(ledger, at_kill)

        await node.start()
        assert_every_accept_stored(ledger, await stored_message_ids(db_dsn))
        assert not ledger.refused, ledger.refused

        client = await RawSMTP.connect(node.smtp_port)
        await client.cmd("EHLO client.test")
        reply = await client.submit("a@example.org", ["b@example.com"], b"Subject: after\r\n")
        await client.close()
        assert reply.startswith("250 2.0.0"), reply
        node.signal(signal.SIGTERM)
        assert await node.wait_exit(15) == 0
    finally:
        await node.close()


async def test_postgres_sigkill_loses_no_accepted_message(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """kill -9 of Postgres (postmaster and backends) right after a burst of 250s.

    A 250 is sent only after the commit returned, and the node's pool sets
    ``synchronous_commit = on``: the commit returns only once its WAL record is flushed
    to disk (``fsync = on``, which the embedded server and the preflight insist on). A
    killed server replays that WAL in crash recovery, so each 250'd row comes back.

    With asynchronous commit (``synchronous_commit = off``) the commit returns while its
    WAL record is still in shared memory; the WAL writer flushes it only every
    ``wal_writer_delay`` (200 ms). SIGKILL of every server process throws that memory away,
    so the last commits before the kill, which this test kills within milliseconds of,
    would be missing after recovery and the test fails. (``fsync = off`` alone loses data
    only when the OS or the machine crashes, which a test cannot do; the preflight refuses
    it instead.)
    """
    async with own_postgres(tmp_path / "pg") as server:
        dsn = server.dsn_for(DATABASE)
        settings = make_settings(
            node={"intake_db_slots": 8},
            database={"dsn": dsn, "acquire_timeout": 2.0, "commit_timeout": 2.0,
                      "connect_timeout": 2.0},
        )
        handle = await start_node(settings)
        try:
            # kill() blocks the loop on purpose: the node cannot run one more step
            # between the 250 the client just read and the SIGKILL.
            ledger, at_kill = await run_until_killed(handle.port, handle.admin_port,
                                                     server.kill)
            assert server.postmaster_pid() is None
            assert_work_in_flight(ledger, at_kill)
            # Commits that failed with the server are 451 (never a 250 then a loss).
            assert all(reply.startswith("451 4.3.0") for reply in ledger.refused.values()), \
                ledger.refused

            await asyncio.to_thread(server.start)  # crash recovery replays the WAL
            assert_every_accept_stored(ledger, await stored_message_ids(dsn))
            await _wait_until_accepting(handle.port)
        finally:
            await handle.stop()


async def _wait_until_accepting(port: int, timeout: float = 20.0) -> None:
    """Submit until a 250 comes back (the node recovers without a restart)."""
    client = await RawSMTP.connect(port)
    try:
        await client.cmd("EHLO client.test")
        replies: list[str] = []

        async def accepted() -> bool:
            reply = await client.submit("a@example.org", ["b@example.com"], b"Subject: x\r\n")
            replies.append(reply)
            return reply.startswith("250")

        await wait_for(accepted, timeout, interval=0.2)
    finally:
        await client.close()
