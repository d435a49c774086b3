"""A node with several processes shares its listener and its budget, and stops as one."""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from mta.config import Settings
from mta.queue import Store
from tests.support.admin import admin_get, healthz, metric
from tests.support.delivery import submit_tagged
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess
from tests.support.sink import Sink
from tests.support.smtp import RawSMTP

PROCESSES = 2


async def node_connections(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mta/proc-node'"
        ))
    finally:
        await conn.close()


async def test_two_processes_serve_one_port_and_exit_zero_on_sigterm(
    tmp_path: Path, db_dsn: str
) -> None:
    node = NodeProcess.configure(tmp_path / "node", db_dsn, node={"processes": PROCESSES})
    node.spawn()
    try:
        await node.wait_started(PROCESSES, timeout=60)
        for index in range(PROCESSES):
            body = await healthz(node.admin_port + index)
            assert body["status"] == "ok" and body["accepting"], (index, body)

        accepted = 0
        for n in range(20):
            client = await RawSMTP.connect(node.smtp_port)
            await client.cmd("EHLO client.test")
            reply = await client.submit("a@example.org", ["b@example.com"],
                                        f"Message-ID: <p{n}@test>\r\n\r\nbody\r\n".encode())
            assert reply.startswith("250 2.0.0"), reply
            accepted += 1
            await client.cmd("QUIT")
            await client.close()
        assert accepted == 20
        per_process = [await metric(node.admin_port + index, "mta_intake_accepted_messages_total")
                       for index in range(PROCESSES)]
        assert sum(per_process) == 20, per_process
        # The store-wide queue gauges come from the first process only: summing over
        # processes counts the queue once.
        exports = [(await admin_get(node.admin_port + index, "/metrics"))[1]
                   for index in range(PROCESSES)]
        assert 'mta_queue_deliveries{state="queued"}' in exports[0]
        assert all("mta_queue_" not in text for text in exports[1:]), exports[1]
        # Each process holds its own pool, sized by the budget: never more than the sum.
        budget = PROCESSES * (2 + 4 + 2)
        assert 0 < await node_connections(db_dsn) <= budget

        node.signal(signal.SIGTERM)
        assert await node.wait_exit(30) == 0
    finally:
        await node.close()
    assert await node_connections(db_dsn) == 0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its reaper has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_node_processes_exit_when_their_supervisor_is_killed(
    tmp_path: Path, db_dsn: str
) -> None:
    node = NodeProcess.configure(tmp_path / "node", db_dsn, node={"processes": PROCESSES})
    node.spawn()
    try:
        await node.wait_started(PROCESSES, timeout=60)
        children = children_of(node.pid)
        assert len(children) == PROCESSES
        node.signal(signal.SIGKILL)
        await node.wait_exit(10)
        await wait_for(lambda: not any(running(c) for c in children), timeout=60)
    finally:
        await node.close()


async def test_sigusr1_writes_every_task_stack_and_the_node_keeps_serving(
    tmp_path: Path, db_dsn: str
) -> None:
    """The diagnostic for a node that seems stuck: what each task is waiting on. The
    supervisor of several processes passes the signal on to each."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn, node={"processes": PROCESSES})
    node.spawn()
    try:
        await node.wait_started(PROCESSES, timeout=60)
        node.signal(signal.SIGUSR1)
        await wait_for(lambda: node.stderr_text().count("name='retention'") == 2 * PROCESSES,
                       timeout=10)
        dump = node.stderr_text()
        assert dump.count("tasks in process") == PROCESSES
        assert "name='health'" in dump and "name='admission'" in dump
        for index in range(PROCESSES):
            assert (await healthz(node.admin_port + index))["status"] == "ok"
    finally:
        node.signal(signal.SIGTERM)
        assert await node.wait_exit(30) == 0
        await node.close()


async def test_a_busy_admin_port_stops_the_node_before_any_process_starts(
    tmp_path: Path, db_dsn: str
) -> None:
    """Every listener is bound before forking: a port in use is one line naming it, not a
    process that crashes after its siblings started serving."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn, node={"processes": PROCESSES})
    busy = f"127.0.0.1:{node.admin_port + 1}"
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", node.admin_port + 1))
        blocker.listen()
        node.spawn()
        try:
            code = await node.wait_exit(30)
        finally:
            await node.close()
    assert code == 1
    assert not node.logged("node.started")
    err = node.stderr_text()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"cannot start: Address already in use ({busy})" in err, err


async def test_two_delivering_processes_share_one_journal_directory_and_deliver_once(
    tmp_path: Path, db_dsn: str, sink: Sink,
) -> None:
    """Both processes start at once on one journal directory (one identity for it, each
    its own owner in the store) and every message is delivered once, whichever sends it.
    Then a SIGKILL of the node and a restart: what was in flight is settled from the
    journal, nothing is called missing."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn, node={"processes": PROCESSES},
                                 delivery={"enabled": True, "poll_interval": 0.5,
                                           "routes": [{"domain": "*", "host": "127.0.0.1",
                                                       "port": sink.port, "tls": "none"}]})
    await node.start()
    try:
        for n in range(20):
            await submit_tagged(node.smtp_port, f"p{n}")
        await sink.wait_for_count(20, timeout=30)
        node.signal(signal.SIGKILL)
        await node.wait_exit(30)
        await node.start()
        for n in range(20, 30):
            await submit_tagged(node.smtp_port, f"p{n}")
        await sink.wait_for_count(30, timeout=30)
        identity = (tmp_path / "node" / "data" / "journal" / "identity").read_text().strip()
        conn = await asyncpg.connect(db_dsn)
        try:
            owners = await conn.fetch("SELECT journal_id FROM journal_owners")
            missing = await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE last_reply LIKE 'journal missing%'")
        finally:
            await conn.close()
        assert len(owners) == 2 * PROCESSES and {o["journal_id"] for o in owners} == {identity}
        assert missing == 0
        assert all(sink.count(f"p{n}@test", "user@example.com") == 1 for n in range(30))
    finally:
        await node.close()


async def test_separate_intake_and_delivery_processes_split_the_work(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    """Postfix's split (issue 13): one process takes SMTP, two deliver. Intake's 250s come
    from the first only, the deliveries from the others only (woken by NOTIFY), each pool
    holds its role's share (I6), and a mode set on the node reaches every process."""
    node = NodeProcess.configure(
        tmp_path / "node", db_dsn, node={"intake_processes": 1, "delivery_processes": 2},
        delivery={"enabled": True, "poll_interval": 60.0,
                  "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port,
                              "tls": "none"}]})
    node.spawn()
    try:
        await node.wait_started(3, timeout=60)
        roles = [(await healthz(node.admin_port + index))["role"] for index in range(3)]
        assert roles == ["intake", "delivery", "delivery"]
        for n in range(30):
            await submit_tagged(node.smtp_port, f"split{n}")
        await sink.wait_for_count(30, timeout=30)
        assert all(sink.count(f"split{n}@test", "user@example.com") == 1 for n in range(30))

        async def delivered_by(index: int) -> float:
            return await labelled(node.admin_port + index, "mta_delivery_outcomes_total",
                                  'outcome="delivered"')

        await wait_for(lambda: _sums_to(delivered_by, [1, 2], 30), timeout=10)
        assert await delivered_by(0) == 0, "the intake process delivers nothing"
        accepted = [await metric(node.admin_port + index, "mta_intake_accepted_messages_total")
                    for index in range(3)]
        assert accepted == [30, 0, 0]
        pools = [await metric(node.admin_port + index, "mta_store_pool_max_connections")
                 for index in range(3)]
        assert pools == [4 + 2, 2 + 2, 2 + 2], "each by its role: intake 4, workers 2, + 2"
        (ready_delivery, _) = await admin_get(node.admin_port + 1, "/readyz")
        assert ready_delivery == 200, "a delivery process is ready without SMTP"

        store = await Store.open(db_dsn, make_settings())
        try:
            await store.set_node_mode("proc-node", "draining", "split drill", "alice")
        finally:
            await store.close()

        async def all_draining() -> bool:
            return all([await labelled(node.admin_port + index, "mta_node_mode",
                                       'mode="draining"') == 1 for index in range(3)])

        await wait_for(all_draining, timeout=15)
    finally:
        node.signal(signal.SIGTERM)
        assert await node.wait_exit(30) == 0
        await node.close()


async def labelled(port: int, name: str, label: str) -> float:
    """The sum of ``name``'s samples whose labels include ``label`` (``key="value"``)."""
    status, text = await admin_get(port, "/metrics")
    assert status == 200, status
    return sum(float(m[1]) for m in re.finditer(
        rf"^{name}{{[^}}]*{re.escape(label)}[^}}]*}} (\S+)$", text, re.MULTILINE))


async def _sums_to(read: Callable[[int], Awaitable[float]], indexes: list[int],
                   total: float) -> bool:
    return sum([await read(index) for index in indexes]) == total
