"""Node modes (DESIGN.md, Node modes; I8), set in the node's store: a draining node
refuses new mail and delivers what it holds; an isolated one delivers nothing, across a
restart too; activated, it delivers again. The node follows its store by itself."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

from mta.config import Settings
from mta.intake import replies
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id
from tests.support.admin import admin_get, metric
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess
from tests.support.sink import Sink
from tests.support.smtp import RawSMTP

PAUSED = re.escape('mta_delivery_paused_rounds_total{reason="isolated"}')


async def held_mail(store: Store, count: int) -> None:
    for n in range(count):
        await store.enqueue(NewMessage(
            id=new_message_id(), mail_from="app@example.org", recipients=["user@example.com"],
            trace_headers=b"", body=f"Message-ID: <held{n}@test>\r\n\r\nbody\r\n".encode(),
            client_address="127.0.0.1", helo_name="h", auth_user=None,
            message_id_header=f"<held{n}@test>"))


def delivering(tmp_path: Path, db_dsn: str, sink: Sink) -> NodeProcess:
    return NodeProcess.configure(tmp_path / "node", db_dsn, delivery={
        "enabled": True, "poll_interval": 0.2,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    })


async def test_a_draining_node_refuses_new_mail_and_delivers_what_it_holds(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    store = await Store.open(db_dsn, make_settings())
    node = delivering(tmp_path, db_dsn, sink)
    try:
        await held_mail(store, 5)
        await store.set_node_mode("proc-node", "draining", "maintenance", "alice")
        await node.start()
        client = await RawSMTP.connect(node.smtp_port)
        assert client.greeting == replies.NODE_NOT_ACTIVE.format(mode="draining")
        await client.close()
        await sink.wait_for_count(5, timeout=15)
        status, _ = await admin_get(node.admin_port, "/readyz")
        assert status == 503
        assert await metric(node.admin_port, re.escape('mta_node_mode{mode="draining"}')) == 1
    finally:
        await node.close()
        await store.close()


async def test_an_isolated_node_delivers_nothing_across_a_restart_until_activated(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    store = await Store.open(db_dsn, make_settings())
    node = delivering(tmp_path, db_dsn, sink)
    try:
        await held_mail(store, 5)
        await store.set_node_mode("proc-node", "isolated", "incident 42", "alice")
        for _run in range(2):
            await node.start()

            async def passed_over() -> bool:
                return await metric(node.admin_port, PAUSED) >= 3

            await wait_for(passed_over, timeout=15)
            assert sink.transactions == [], "an isolated node sent nothing"
            assert (tmp_path / "node" / "data" / "mode").read_text().strip() == "isolated"
            node.signal(signal.SIGTERM)
            assert await node.wait_exit(15) == 0
        await node.start()
        await store.set_node_mode("proc-node", "active", "incident over", "alice")
        await sink.wait_for_count(5, timeout=15)
        await node.wait_logged("node.mode")
        assert (await admin_get(node.admin_port, "/readyz"))[0] == 200
        actions = [record.action for record in await store.audit_records()]
        assert actions == ["mode:active", "mode:isolated"]
    finally:
        await node.close()
        await store.close()


async def test_a_mode_change_reaches_the_node_through_notify_before_any_poll(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
) -> None:
    """With a poll of a minute, only the NOTIFY can bring the change in time."""
    store = await Store.open(db_dsn, make_settings())
    node = NodeProcess.configure(tmp_path / "node", db_dsn, node={"mode_poll": 60.0})
    try:
        await node.start()
        assert (await admin_get(node.admin_port, "/readyz"))[0] == 200
        await store.set_node_mode("proc-node", "isolated", "incident 43", "bob")

        async def isolated() -> bool:
            return (await admin_get(node.admin_port, "/readyz"))[0] == 503

        await wait_for(isolated, timeout=10)
        await node.wait_logged("node.mode")
    finally:
        await node.close()
        await store.close()
